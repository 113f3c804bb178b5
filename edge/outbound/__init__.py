"""Outbound mail: the relay listener for devices, DKIM signing."""
