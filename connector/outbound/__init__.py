"""The device's side of sending mail: the durable outbound queue, the relay to the edge, the
outcomes the edge reports, and the submission listener for local mail clients.

`queue.OutboundQueue` keeps every submitted message on disk until the edge has taken it,
`relay.EdgeRelay` hands messages to the edge's relay listener over SMTP, `events` keeps the
outbound event log (submitted, relayed, delivered, deferred, bounced), `poller` asks the
edge what became of relayed messages, and `submission` is the RFC 6409 listener. Nothing in
this package blocks the reactor thread: disk work runs through an injected `run_blocking`.
"""
