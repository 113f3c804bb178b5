"""The delivery queue and its SMTP client: routing, sessions, DSNs, events and operator actions."""
