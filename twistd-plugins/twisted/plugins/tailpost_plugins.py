"""twistd plugin shims: `twistd -n tailpost-edge`, `tailpost-device` and `tailpost`.

Thin on purpose: options and service construction live in `edge.tap`.
"""

from twisted.application.service import ServiceMaker

tailpost_edge = ServiceMaker(
    "tailpost edge", "edge.tap", "The public MX and relay of tailpost.", "tailpost-edge"
)
tailpost_device = ServiceMaker(
    "tailpost device",
    "connector.tap",
    "The tailpost device: connector, IMAP and local API.",
    "tailpost-device",
)
tailpost_allinone = ServiceMaker(
    "tailpost all-in-one",
    "connector.allinone",
    "Edge and device in one process (embedded defaults).",
    "tailpost",
)
