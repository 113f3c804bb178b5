"""A light, explainable risk summary of a message for API clients (people and agents).

The edge's verdict (`maildir.verdict`: SPF, DKIM and DMARC results, spam verdict, score and
symbols), which the device trusts because only its authenticated edge can deliver and the
edge strips forged verdict headers, plus heuristics on attachment names and types and what
sanitizing the HTML body found (`maildir.htmlsafe`: active content, remote content and
tracking pixels, hidden text, links whose text names another site). A message without the
edge's verdict (one written into the Maildir by other software, or appended over IMAP) has
no authentication results the device can trust: any `Authentication-Results` field in it
was written by someone else, so its results read as "none". Every finding is a flag: a
machine-readable code, a level, a count and a short reason; `reasons` keeps the reasons
alone. A flag's reason never quotes the message's hidden text. This module is advice
for the reader; it must never block, change or delete mail, and never claim a message is
safe (the lowest level is "low").
"""

from __future__ import annotations

import mimetypes
from typing import Any

from maildir.htmlsafe import HTMLFinding
from maildir.message import AttachmentInfo, MessageDetail
from maildir.verdict import Verdict

__all__ = [
    "EXECUTABLE_EXTENSIONS",
    "HTML_LEVELS",
    "assess_attachment",
    "assess_message",
    "html_flags",
]

EXECUTABLE_EXTENSIONS = frozenset(
    "exe scr com bat cmd pif msi msp msc cpl dll sys drv ocx js jse vbs vbe wsf wsh wsc hta "
    "ps1 psm1 psd1 jar lnk url reg inf scf chm gadget application appref-ms app command "
    "sh bash apk deb rpm run bin elf".split()
)
# Not executable by themselves, but common carriers of active content or disguise.
CAUTION_EXTENSIONS = frozenset(
    "html htm xhtml shtml svg mht mhtml iso img vhd vhdx docm dotm xlsm xltm xlam pptm potm "
    "ppam one onepkg xll iqy slk".split()
)
# Extensions people expect to be harmless: seen second to last, they are a disguise.
_DECOY_EXTENSIONS = frozenset(
    "pdf doc docx xls xlsx ppt pptx odt ods txt rtf csv jpg jpeg png gif bmp mp3 mp4 "
    "wav mov avi zip".split()
)
_COMPRESSION_EXTENSIONS = frozenset({"gz", "bz2", "xz", "zst", "z"})
_GENERIC_TYPES = frozenset(
    {
        "application/octet-stream",
        "application/x-download",
        "application/force-download",
        "application/binary",
        "application/unknown",
        "binary/octet-stream",
    }
)
_TYPE_ALIASES = {
    "image/jpg": "image/jpeg",
    "image/pjpeg": "image/jpeg",
    "application/x-pdf": "application/pdf",
    "application/x-zip-compressed": "application/zip",
    "application/x-zip": "application/zip",
    "text/x-csv": "text/csv",
    "text/comma-separated-values": "text/csv",
}
_MIME = mimetypes.MimeTypes(filenames=())
_LEVELS = ("low", "medium", "high")
_SUMMARIES = {
    "low": "No warning signs were found in the message headers, body or attachments.",
    "medium": "Some caution signals were found in the message headers, body or attachments.",
    "high": "Strong warning signs were found; do not open the attachments or follow links.",
}
_ATTACHMENT_SUMMARIES = {
    "low": "No warning signs were found for this attachment.",
    "medium": "The attachment has some warning signs worth checking before opening.",
    "high": "The attachment looks dangerous; do not open it.",
}
_FAILED = frozenset({"fail", "softfail", "permerror"})
# The level each finding of the HTML body raises the message to. Hidden text is how a
# message speaks to an agent behind its reader's back; active content and disguised links
# have no place in honest mail; remote content and tracking pixels are common in it.
HTML_LEVELS = {
    "hidden_text": "medium",
    "script": "medium",
    "event_handler": "medium",
    "javascript_url": "medium",
    "data_url": "medium",
    "embedded_content": "medium",
    "form": "medium",
    "meta_refresh": "medium",
    "base_url": "low",
    "mismatched_link": "medium",
    "remote_content": "low",
    "tracking_pixel": "low",
    "html_truncated": "low",
}


def _max_level(levels: list[str]) -> str:
    return max(levels, key=_LEVELS.index, default="low")


def _extensions(filename: str) -> list[str]:
    parts = filename.lower().split(".")
    return [p.strip() for p in parts[1:] if p.strip()] if len(parts) > 1 else []


def _guessed_type(filename: str) -> str | None:
    guessed, _encoding = _MIME.guess_type(filename, strict=False)
    return guessed


def attachment_reasons(info: AttachmentInfo) -> list[tuple[str, str]]:
    """(level, reason) findings for one attachment."""
    findings: list[tuple[str, str]] = []
    exts = _extensions(info.filename)
    last = exts[-1] if exts else ""
    if last in EXECUTABLE_EXTENSIONS:
        findings.append(("high", f"executable file type .{last}"))
    elif last in CAUTION_EXTENSIONS:
        findings.append(("medium", f"file type .{last} can carry active content"))
    compressed = last in _COMPRESSION_EXTENSIONS
    if len(exts) >= 2 and exts[-2] in _DECOY_EXTENSIONS and exts[-2] != last and not compressed:
        level = "high" if last in EXECUTABLE_EXTENSIONS else "medium"
        findings.append((level, f"double extension .{exts[-2]}.{last}"))
    declared = _TYPE_ALIASES.get(info.content_type.lower(), info.content_type.lower())
    guessed = _guessed_type(info.filename)
    guessed = _TYPE_ALIASES.get(guessed, guessed) if guessed else None
    if guessed and declared not in _GENERIC_TYPES and guessed != declared:
        findings.append(("medium", f"declared type {declared} does not match .{last}"))
    return findings


def assess_attachment(info: AttachmentInfo) -> dict[str, Any]:
    level = _max_level([level for level, _ in attachment_reasons(info)])
    return {"level": level, "summary": _ATTACHMENT_SUMMARIES[level], "method": "heuristic"}


_Flag = tuple[str, str, int, str]  # level, code, count, reason


def _verdict_findings(verdict: Verdict) -> list[_Flag]:
    findings: list[_Flag] = []
    if verdict.spam == "Yes":
        score = f" (score {verdict.score:g})" if verdict.score is not None else ""
        findings.append(("medium", "spam", 1, f"the edge's spam scan says spam{score}"))
    if verdict.junk:
        reason = f": {verdict.reason}" if verdict.reason else ""
        findings.append(("medium", "junk", 1, f"the edge filed this as junk{reason}"))
    return findings


def html_flags(findings: tuple[HTMLFinding, ...]) -> list[_Flag]:
    """The flags of what sanitizing the HTML body found."""
    return [(HTML_LEVELS.get(f.code, "medium"), f.code, f.count, f.reason) for f in findings]


def assess_message(detail: MessageDetail, verdict: Verdict | None = None) -> dict[str, Any]:
    """The message-level risk: the edge's verdict, authentication
    failures and the worst attachment finding."""
    # Without the edge's verdict, nothing says who wrote an Authentication-Results field.
    unknown = {"spf": "none", "dkim": "none", "dmarc": "none"}
    auth = verdict.authentication() if verdict is not None else unknown
    findings: list[_Flag] = []
    for method, result in auth.items():
        if result in _FAILED:
            findings.append(("medium", "authentication_failed", 1, f"{method} {result}"))
    if verdict is not None:
        findings.extend(_verdict_findings(verdict))
    for info in detail.attachments:
        findings.extend(
            (level, "attachment", 1, f"{info.filename}: {reason}")
            for level, reason in attachment_reasons(info)
        )
    findings.extend(html_flags(detail.html_findings))
    level = _max_level([flag[0] for flag in findings])
    risk: dict[str, Any] = {
        "level": level,
        "summary": _SUMMARIES[level],
        "method": "header+heuristic" if verdict is not None else "heuristic",
        "authentication": auth,
    }
    spam = verdict.spam_summary() if verdict is not None else None
    if spam is not None:
        risk["spam"] = spam
    risk["reasons"] = [flag[3] for flag in findings]
    risk["flags"] = [
        {"code": code, "level": lvl, "count": count, "reason": reason}
        for lvl, code, count, reason in findings
    ]
    return risk
