"""The MX side: the inbound session policy, the MX listener's factory, the acceptor processes."""
