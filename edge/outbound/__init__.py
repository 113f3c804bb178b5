"""The edge's outbound side: the relay that takes devices' mail (``edge.outbound.relaylistener``,
``edge.outbound.relaypolicy``) and what is done to it before it leaves for the Internet (DKIM
signing in ``edge.outbound.dkimsign``). Nothing here delivers."""
