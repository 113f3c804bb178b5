"""Domain onboarding's DNS work: scanning a domain, checking its route, re-checking it over time."""
