"""The one table of SMTP replies (code, enhanced code, text) and the error that carries one.

Every reply the servers send comes from here, so the wording and codes stay consistent and
a test can check each reply's class against its enhanced code's class. So does every reply
that delivery records of a recipient (the `D` replies: what the queue, routing and the
delivery client say of an attempt), which a report to the sender may quote: a recorded reply
is one of these, or a remote server's own reply, never an exception's text. A text's
`{name}` fields are filled with `format`. Nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str
    text: str

    def with_text(self, text: str) -> Reply:
        return Reply(self.code, self.enhanced, text)

    def format(self, **values: object) -> Reply:
        """This reply with its text's `{name}` fields filled in."""
        return Reply(self.code, self.enhanced, self.text.format(**values))

    @property
    def detail(self) -> str:
        """The enhanced code and the text: what a delivery outcome's text holds."""
        return f"{self.enhanced} {self.text}" if self.enhanced else self.text

    @property
    def status(self) -> str:
        """The whole reply on one line ("451 4.4.3 DNS lookup failed for now"): how delivery
        records it."""
        return f"{self.code} {self.detail}"

    def lines(self) -> list[bytes]:
        """The reply as CRLF-terminated wire lines (multi-line when text has newlines)."""
        parts = self.text.split("\n") or [""]
        out = []
        for i, part in enumerate(parts):
            sep = "-" if i < len(parts) - 1 else " "
            prefix = f"{self.code}{sep}"
            body = f"{self.enhanced} {part}" if self.enhanced else part
            out.append((prefix + body).encode("utf-8", "replace") + b"\r\n")
        return out

    @cached_property
    def wire(self) -> bytes:
        """`lines()` joined: what goes on the wire (made once per reply)."""
        return b"".join(self.lines())

    @property
    def is_error(self) -> bool:
        return self.code >= 400


class SMTPReplyError(Exception):
    """Raised by policy code to answer with `reply`; `reason` goes to the log only."""

    def __init__(self, reply: Reply, reason: str = "") -> None:
        super().__init__(reason or reply.text)
        self.reply = reply
        self.reason = reason


# 2xx
S211_HELP = Reply(
    214, "2.0.0", "Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS"
)
S220_READY_TLS = Reply(220, "2.0.0", "Ready to start TLS")
S221_BYE = Reply(221, "2.0.0", "Bye")
S235_AUTH_OK = Reply(235, "2.7.0", "Authentication succeeded")
S250_OK = Reply(250, "2.0.0", "OK")
S250_SENDER_OK = Reply(250, "2.1.0", "Sender OK")
S250_RCPT_OK = Reply(250, "2.1.5", "Recipient OK")
S250_QUEUED = Reply(250, "2.0.0", "Queued as {qid}")
S250_RESET = Reply(250, "2.0.0", "Reset")
S252_VRFY = Reply(252, "2.5.0", "Cannot verify the user, but will accept mail and attempt delivery")
# 3xx
S334_AUTH_CONTINUE = Reply(334, "", "")
# AUTH LOGIN's two questions, "Username:" and "Password:" in base64.
S334_LOGIN_USERNAME = Reply(334, "", "VXNlcm5hbWU6")
S334_LOGIN_PASSWORD = Reply(334, "", "UGFzc3dvcmQ6")
S354_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
# 4xx
S421_SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
S421_IDLE = Reply(421, "4.4.2", "Idle timeout, closing connection")
S421_TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
S421_TOO_MANY_FROM_IP = Reply(
    421, "4.7.0", "Too many connections from your address, try again later"
)
S421_TOO_MANY_FROM_NETWORK = Reply(
    421, "4.7.0", "Too many connections from your network, try again later"
)
S421_COMMAND_TIMEOUT = Reply(421, "4.4.2", "Command not completed in time, closing connection")
S421_DATA_TOO_SLOW = Reply(421, "4.4.2", "Message data too slow, closing connection")
S421_AUTH_FAILURES = Reply(421, "4.7.0", "Too many authentication failures, closing connection")
S421_TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
S421_TOO_MANY_JUNK = Reply(421, "4.7.0", "Too many commands without mail, closing connection")
S451_INTERNAL = Reply(451, "4.3.0", "Temporary internal error, try again later")
S451_TIMEOUT = Reply(451, "4.4.5", "Timed out processing the request, try again later")
S452_TOO_MANY_RCPTS = Reply(452, "4.5.3", "Too many recipients")
S454_TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available")
S451_POLICY_TEMP = Reply(451, "4.7.1", "Temporary policy failure, try again later")
S451_DNS_TEMP = Reply(451, "4.4.3", "Temporary DNS failure, try again later")
S451_CHECK_TIMEOUT = Reply(451, "4.4.5", "Timed out checking the message, try again later")
# The relay (edge.outbound): the sender domain's active DKIM key cannot be used. Mail is never
# sent unsigned instead; RFC 3463 X.7.5 is "cryptographic failure" (a key not available or
# not valid), transient because the operator can replace the key.
S451_DKIM_KEY_UNUSABLE = Reply(
    451, "4.7.5", "Cannot sign the message with the domain's DKIM key, try again later"
)
# A recipient of a domain whose owner proved it but whose route the edge has not seen become
# active yet (its DNS records are still appearing): refused only for now, so senders retry and
# the mail arrives once the route is active. 450 is RFC 5321's "mailbox unavailable" for a
# condition that passes. RFC 3463 X.4.4 "Unable to route" names what is missing: the routing
# information for the next hop, usable for "persistent transient errors". Not X.2.x (it would
# say the mailbox exists, which nobody knows yet), not X.7.1 (that is about the sender's
# authorization) and not X.3.0 (nothing failed on the edge).
S450_ROUTE_NOT_ACTIVE = Reply(
    450, "4.4.4", "Mail for this domain is not accepted yet, try again later"
)
# Outcomes of delivery to a domain's MX hosts (the delivery client's words, recorded for a
# recipient and shown in a DSN). MTA-STS (RFC 8461) failures are temporary: the mail waits for
# the receiver to put its TLS right or for a new policy (section 5). RFC 3463 X.7.5
# "Cryptographic failure" for a certificate that does not verify or a host the policy does
# not name, X.7.4 "Security features not supported" for STARTTLS not offered.
D451_STS_NO_MX = Reply(451, "4.7.5", "no MX host of {domain} matches its MTA-STS policy")
D451_STS_NO_STARTTLS = Reply(
    451, "4.7.4", "{where} does not offer STARTTLS, which the MTA-STS policy needs"
)
D451_STS_CERTIFICATE = Reply(
    451, "4.7.5", "the TLS certificate of {where} is not valid for it, as the MTA-STS policy needs"
)
# 5xx
S500_UNKNOWN = Reply(500, "5.5.2", "Command not recognized")
S500_LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
S501_SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters")
S501_BAD_ADDRESS = Reply(501, "5.1.7", "Malformed address")
S501_HELO_ARG = Reply(501, "5.5.4", "HELO/EHLO needs a domain name or address literal")
S502_NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
S503_BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
S530_AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
S504_AUTH_MECH = Reply(504, "5.5.4", "Unrecognized authentication mechanism")
S535_AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
# RFC 3207 §4 and RFC 4954 §6: AUTH (and so mail) only once the session is encrypted.
S530_STARTTLS_FIRST = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
S538_ENCRYPTION_REQUIRED = Reply(
    538, "5.7.11", "Encryption required for requested authentication mechanism"
)
S550_NO_SUCH_USER = Reply(550, "5.1.1", "No such user here")
S550_BARE_NEWLINE = Reply(550, "5.6.0", "Bare CR or LF in message data is not allowed")
S552_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds the limit")
S552_LINE_TOO_LONG = Reply(552, "5.6.0", "Message line too long")
S552_HEADER_TOO_BIG = Reply(552, "5.3.4", "Message header section exceeds the limit")
S553_NON_ASCII = Reply(553, "5.6.7", "Non-ASCII address needs SMTPUTF8")
# The relay (edge.outbound): a device may send only as an address its account owns.
S553_SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address not owned by this device's account")
# ... and so may its From and Sender header fields name only such addresses (DMARC aligns with
# From; people read it). A From or Sender that cannot be read clearly is a format error.
S550_FROM_NOT_OWNED = Reply(550, "5.7.1", "From header address not owned by this device's account")
S550_SENDER_FIELD_NOT_OWNED = Reply(
    550, "5.7.1", "Sender header address not owned by this device's account"
)
S550_FROM_INVALID = Reply(550, "5.6.0", "Message needs one From header of valid addresses")
S550_SENDER_FIELD_INVALID = Reply(
    550, "5.6.0", "Message may have one Sender header, of one valid address"
)
S554_LOOP = Reply(554, "5.4.6", "Too many Received headers: mail loop")
S554_NO_VALID_RCPTS = Reply(554, "5.5.1", "No valid recipients")
S555_PARAM = Reply(555, "5.5.4", "Unsupported MAIL/RCPT parameter")


# Refusals by the inbound checks (enhanced codes of RFC 3463 and RFC 7372).
S550_SPF_FAIL = Reply(550, "5.7.23", "SPF validation failed")
S550_DKIM_FAIL = Reply(550, "5.7.20", "No valid DKIM signature")
S550_DMARC_REJECT = Reply(550, "5.7.1", "Rejected by the sender domain's DMARC policy")
S550_ARC_FAIL = Reply(550, "5.7.29", "ARC validation failed")
S550_TWO_FROM = Reply(550, "5.6.0", "Message format not accepted (more than one From header)")
S550_SENDER_BLOCKED = Reply(550, "5.7.1", "Sender is blocked by the recipient")
S550_SPAM = Reply(550, "5.7.1", "Message rejected as spam")
S554_DNSBL = Reply(554, "5.7.1", "Client host is on a DNS blocklist")
S550_POLICY = Reply(550, "5.7.1", "Message rejected by policy")


# The submission listener (RFC 6409, connector.outbound.submission): a login sends only as its
# own address, and only clients on this machine may connect.
S553_SUBMIT_SENDER_NOT_OWNED = Reply(
    553, "5.7.1", "Sender address not owned by the authenticated user"
)
S553_SUBMIT_FROM_NOT_OWNED = Reply(
    553, "5.7.1", "From header address not owned by the authenticated user"
)
S554_SUBMIT_LOCAL_ONLY = Reply(554, "5.7.1", "Submission is open to this machine's clients only")
S554_SUBMIT_BAD_MESSAGE = Reply(554, "5.6.0", "Message not accepted for submission")

# Delivery: what is recorded of a recipient's attempt, and what a report may quote of it.
# The queue's own replies.
D451_PASSING_FAULT = Reply(
    451, "4.4.1", "delivery failed for now: a passing fault of the mail system"
)
D451_HELD = Reply(451, "4.3.0", "held by the mail system for its operator")
# Why it was held, with the defect: for the operator (`queue show`), never recorded as a reply.
D451_HELD_DEFECT = Reply(451, "4.3.0", "held after a defect in delivery: {defect}")
D451_DNS_FAILED = Reply(451, "4.4.3", "DNS lookup failed for now")
# A device's address on the private network is the operator's to know, never a sender's.
D451_DEVICE_UNREACHABLE = Reply(451, "4.4.1", "the recipient's device cannot be reached now")
D451_OLDER_FIRST = Reply(451, "4.4.1", "older mail to it goes first")
D451_NO_REPLY = Reply(451, "4.3.0", "no reply for this recipient")
D550_RETURNED = Reply(550, "5.0.0", "Returned to sender by the mail system's operator")
# Routing (`edge.delivery.routing.NoRoute`).
D451_NO_CONNECTOR_ADDRESS = Reply(451, "4.4.0", "device {device} has no connector address")
D451_CONNECTOR_NOT_FOUND = Reply(451, "4.4.4", "connector host {host} of device {device} not found")
D451_OLD_MX_NO_ADDRESS = Reply(451, "4.4.4", "no address for the old MX host(s) {names}")
D550_NO_SUCH_USER = Reply(550, "5.1.1", "no such user here")
D550_NO_ROUTE = Reply(550, "5.1.1", "no route to this address")
D550_BAD_ADDRESS = Reply(550, "5.1.3", "bad recipient address")
D556_NULL_MX = Reply(556, "5.1.10", "{domain} accepts no mail (null MX)")
D550_NO_MX_NO_ADDRESS = Reply(550, "5.1.2", "{domain} has no MX and no address")
D550_NO_MX_ADDRESS = Reply(550, "5.4.4", "no MX host of {domain} has an address")
# The delivery client, for a failure with no reply of the server's to quote; `{where}` is
# the host (and address) it went to.
D451_NOT_DELIVERED = Reply(451, "4.4.1", "delivery to {where} failed")
D451_NO_CONNECTION = Reply(451, "4.4.1", "no connection to {where}")
D451_CONNECTION_LOST = Reply(451, "4.4.2", "the connection to {where} was lost")
D451_TIMED_OUT = Reply(451, "4.4.2", "{where} did not answer in time")
D451_TLS_FAILED = Reply(451, "4.7.0", "TLS with {where} failed")
D451_TLS_NOT_OFFERED = Reply(451, "4.7.0", "{where} does not offer STARTTLS, which is required")
D451_PREPARE_FAILED = Reply(451, "4.3.0", "preparing the data failed")
D451_PIN_MISMATCH = Reply(
    451,
    "4.7.0",
    "the connector at {where} presented a TLS key with pin {seen}, not the device's pin"
    " {pin}; credentials not sent, will retry",
)
D451_PIN_NO_STARTTLS = Reply(
    451, "4.7.0", "the connector at {where} does not offer STARTTLS; credentials not sent"
)
D553_NO_SMTPUTF8 = Reply(553, "5.6.7", "{where} does not offer SMTPUTF8, which this message needs")
# RFC 6152 §3: 8-bit data to a server without 8BITMIME is converted or returned. Converting
# would break the DKIM signature the edge put on the message: it is returned.
D554_NO_8BITMIME = Reply(554, "5.6.3", "{where} does not offer 8BITMIME, which this message needs")
# The device's relay to its edge (connector.outbound), as its outbound queue records them.
D451_NOT_LINKED = Reply(451, "4.7.0", "this device is not linked to an edge yet")
D451_NO_RELAY_ADDRESS = Reply(451, "4.3.5", "no address of the edge's relay is known yet")
D554_NOT_RELAYED = Reply(554, "5.4.7", "not relayed to the edge in {span}; last: {last}")


def all_replies() -> dict[str, Reply]:
    """Every named reply of this module, by name (the servers' and delivery's)."""
    return {k: v for k, v in globals().items() if k[:1] in "SD" and isinstance(v, Reply)}
