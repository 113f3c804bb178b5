"""The device's loopback API, `/localapi/v0`: its mail, status, events, spam reports and login."""
