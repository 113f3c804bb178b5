"""The edge's outbound side: what is done to a device's mail before it leaves for the Internet
(DKIM signing in ``edge.outbound.dkimsign``). Nothing here listens or delivers."""
