"""The one parser of every dataset format: prompts (JSONL, ShareGPT JSON, CSV), traces (Mooncake
JSONL, the Azure LLM inference trace CSV) and tokenizers (`tokenizer.json`).

The controller uses it to validate a file when it is uploaded (DatasetService) or inlined in a
run spec (`Dataset.content`); the agent uses it again on the bytes it fetched (FetchDataset).
The line formats (JSONL, CSV, Mooncake, Azure) and ShareGPT's JSON list are read incrementally
from an iterable of byte chunks, so validating a 200 MB file needs memory for one entry, not for
the file. Every error is a `DatasetError` whose message names where (`line 17`, or `[17]`, the
index in a ShareGPT list) and the field, e.g. `line 17: field "max_tokens": must be an integer
1..1000000`.

Prompt entries (`run_pb2.DatasetEntry`)
---------------------------------------
- JSONL: one object per line, `{"prompt": "..."}` or `{"messages": [{"role", "content"}, ...]}`,
  optional `max_tokens`. Blank lines are skipped. `prompt` of a `messages` entry is its user
  messages joined by newlines.
- ShareGPT: a JSON list of `{"conversations": [{"from": "human", "value": ...}, ...]}`. As vLLM's
  benchmark: the first human turn is the prompt, the following gpt turn's word count is
  `max_tokens`; a conversation without such a pair is skipped (ShareGPT dumps are messy).
- CSV: a header row with a `prompt` column, optional `max_tokens` (empty: the workload's output
  length) and `system` (a system message before the prompt). Quoted fields may span lines; a
  record's error names the line it starts on.

Conversations (`all_turns=True`)
--------------------------------
With `all_turns` an entry is a whole conversation, kept in `DatasetEntry.messages`: an optional
`system` message first, then `user` and `assistant` messages alternating, starting with `user`.
Turn *i* of the conversation is the *i*-th user message; its `max_tokens` is the word count of
the assistant message that follows it (at least 1) — the dataset's reply is only a length, the
replay sends the server's own replies as history. A conversation may end with a user message
without a reply (JSONL only): that turn uses the entry's `max_tokens` (the line's own
`max_tokens` field, kept in `DatasetEntry.max_tokens`; 0: the workload's output length).
`DatasetEntry.prompt` is the first user message. `conversation_turns(entry)` returns
`(system, [ConversationTurn(prompt, max_tokens)])`.
- ShareGPT: `human`/`user` turns are user messages, `gpt`/`assistant`/`chatgpt`/`bing`/`bard`
  replies, a leading `system` turn the system message. A conversation is cut where the
  alternation breaks and at a trailing human turn without a reply; one left without a complete
  turn is skipped.
- JSONL `messages`: must alternate as above (the error names the message index); a JSONL
  `prompt` entry is a conversation of one turn.
Filters on prompt words (`min_prompt_words`, `max_prompt_words`) count the words of all the
entry's messages (its prompt for a prompt entry).

Traces (`TraceRequest`)
-----------------------
- Mooncake JSONL: `timestamp` (ms), `input_length`, `output_length` (integers >= 1) and
  `hash_ids` (a list of integers >= 0, optional: missing means none). Each hash id names one
  block of `block_tokens` prompt tokens (equal ids, equal text). Fewer ids than
  ceil(input_length / block_tokens) is fine (the rest of the prompt is unique text); more is an
  error when `parse_trace` is given `block_tokens` (the upload cannot check it: the block size is
  a run's setting, `Trace.block_tokens`).
- Azure CSV: a header with `TIMESTAMP`, `ContextTokens` and `GeneratedTokens` (other columns are
  ignored); TIMESTAMP is a date and time such as `2023-11-16 18:15:46.6805900` (any number of
  fractional digits, UTC unless an offset is given).
In both, requests must be in time order (a decreasing time is an error naming its line), and
`timestamp_ms` is relative to the first request (the first is 0.0).

Tokenizers: a Hugging Face `tokenizer.json`, validated by loading it (`common.tokenizer`).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from common.proto.loadtest.v1 import run_pb2

MAX_TOKENS_LIMIT = 1_000_000
_ROLES = frozenset({"system", "user", "assistant"})
_SHAREGPT_USER = frozenset({"human", "user"})
_SHAREGPT_ASSISTANT = frozenset({"gpt", "assistant", "chatgpt", "bing", "bard", "model"})

PROMPT_FORMATS = frozenset({run_pb2.DATASET_FORMAT_JSONL, run_pb2.DATASET_FORMAT_SHAREGPT, run_pb2.DATASET_FORMAT_CSV})
TRACE_FORMATS = frozenset({run_pb2.DATASET_FORMAT_MOONCAKE_TRACE, run_pb2.DATASET_FORMAT_AZURE_TRACE})
TOKENIZER_FORMATS = frozenset({run_pb2.DATASET_FORMAT_TOKENIZER})

# Short names (CLI flags, file extensions) of the formats.
FORMAT_BY_NAME: dict[str, int] = {
    "jsonl": run_pb2.DATASET_FORMAT_JSONL,
    "sharegpt": run_pb2.DATASET_FORMAT_SHAREGPT,
    "csv": run_pb2.DATASET_FORMAT_CSV,
    "mooncake": run_pb2.DATASET_FORMAT_MOONCAKE_TRACE,
    "azure": run_pb2.DATASET_FORMAT_AZURE_TRACE,
    "tokenizer": run_pb2.DATASET_FORMAT_TOKENIZER,
}
NAME_BY_FORMAT: dict[int, str] = {v: k for k, v in FORMAT_BY_NAME.items()}


class DatasetError(ValueError):
    """A dataset that cannot be used. The message names the line (or list index) and the field."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a trace: when (ms from the trace's first request), its lengths in tokens,
    and the ids of its prompt's blocks (Mooncake; empty for Azure)."""

    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ConversationTurn:
    """One turn of a dataset conversation (`all_turns`): the user's prompt and its max_tokens
    (0: the workload's output length)."""

    prompt: str
    max_tokens: int


@dataclass(frozen=True, slots=True)
class Summary:
    """What validating a dataset found: its entries (prompts, conversations, trace requests; 0
    for a tokenizer) and, for a trace, the time from the first to the last request."""

    entry_count: int
    span_s: float = 0.0


def format_name(fmt: int) -> str:
    """`jsonl`, `sharegpt`, ... for a DatasetFormat value, or its number when unknown."""
    return NAME_BY_FORMAT.get(fmt, str(fmt))


def dataset_id(fmt: int, content_sha256: str) -> str:
    """The content-addressed id of an uploaded dataset: `ds_` and 32 hex digits of
    sha256(format enum name + ":" + the content's SHA-256 hex)."""
    key = f"{run_pb2.DatasetFormat.Name(fmt)}:{content_sha256}".encode()  # type: ignore[arg-type]
    return "ds_" + hashlib.sha256(key).hexdigest()[:32]


def _field_error(where: str, field: str, problem: str) -> DatasetError:
    return DatasetError(f'{where}: field "{field}": {problem}', field)


def _unreadable(exc: RecursionError | ValueError) -> str:
    """What is wrong with JSON that parses but Python cannot hold: nesting deeper than the
    interpreter's recursion limit, or an integer longer than int's digit limit (4300)."""
    if isinstance(exc, RecursionError):
        return "JSON nested too deeply"
    return "a number with too many digits"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _max_tokens(value: Any, where: str) -> int:
    if value is None:
        return 0
    if not _is_int(value) or not 1 <= value <= MAX_TOKENS_LIMIT:
        raise _field_error(where, "max_tokens", f"must be an integer 1..{MAX_TOKENS_LIMIT}")
    return int(value)


def _reply_tokens(text: str) -> int:
    return max(1, min(len(text.split()), MAX_TOKENS_LIMIT))


# --- reading bytes ---------------------------------------------------------------------------


def _as_chunks(data: bytes | Iterable[bytes]) -> Iterable[bytes]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return (bytes(data),)
    return data


def iter_lines(data: bytes | Iterable[bytes]) -> Iterator[tuple[int, str]]:
    """(line number from 1, text with its newline) of UTF-8 content given in chunks of any size."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    number = 0
    pending = ""
    for chunk in _as_chunks(data):
        try:
            text = decoder.decode(bytes(chunk))
        except UnicodeDecodeError as exc:
            at = number + pending.count("\n") + bytes(chunk)[: max(exc.start, 0)].count(b"\n") + 1
            raise DatasetError(f"line {at}: not valid UTF-8") from None
        if not text:
            continue
        text = pending + text
        lines = text.split("\n")
        pending = lines.pop()
        for line in lines:
            number += 1
            yield number, line + "\n"
    try:
        pending += decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DatasetError(f"line {number + 1}: not valid UTF-8") from None
    if pending:
        yield number + 1, pending


def _json_lines(data: bytes | Iterable[bytes]) -> Iterator[tuple[str, Any]]:
    """(`line N`, the decoded object) of each non-blank line of a JSONL file."""
    for number, line in iter_lines(data):
        if not line.strip():
            continue
        text = line[1:] if number == 1 and line.startswith("\ufeff") else line
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"line {number}: not valid JSON ({exc.msg})") from None
        except (RecursionError, ValueError) as exc:
            raise DatasetError(f"line {number}: {_unreadable(exc)}") from None
        yield f"line {number}", obj


def _csv_rows(data: bytes | Iterable[bytes]) -> Iterator[tuple[str, dict[str, str]]]:
    """(`line N`, {column: value}) of each record of a CSV file with a header row."""
    csv.field_size_limit(max(csv.field_size_limit(), 256 * 1024 * 1024))
    lines = (line for _, line in iter_lines(data))
    reader = csv.reader(lines)
    try:
        header = next(reader)
    except StopIteration:
        raise DatasetError("the file is empty") from None
    except csv.Error as exc:
        raise DatasetError(f"line 1: not valid CSV ({exc})") from None
    if header and header[0].startswith("\ufeff"):
        header[0] = header[0][1:]
    names = [h.strip() for h in header]
    last = reader.line_num
    while True:
        start = last + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DatasetError(f"line {start}: not valid CSV ({exc})") from None
        last = reader.line_num
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) > len(names):
            raise DatasetError(f"line {start}: {len(row)} columns; the header has {len(names)}")
        yield f"line {start}", dict(zip(names, row, strict=False))


# --- prompt entries --------------------------------------------------------------------------


def _messages(obj: dict[str, Any], where: str) -> list[run_pb2.ChatMessage]:
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise _field_error(where, "messages", "must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise _field_error(where, f"messages[{i}].role", "must be system, user or assistant")
        if not isinstance(m.get("content"), str):
            raise _field_error(where, f"messages[{i}].content", "must be a string")
        out.append(run_pb2.ChatMessage(role=m["role"], content=m["content"]))
    return out


def _check_alternation(messages: list[run_pb2.ChatMessage], where: str) -> None:
    """A conversation: an optional system message first, then user/assistant alternating."""
    start = 1 if messages[0].role == "system" else 0
    if start == len(messages):
        raise _field_error(where, "messages", "a conversation needs a user message after the system message")
    for i in range(start, len(messages)):
        want = "user" if (i - start) % 2 == 0 else "assistant"
        if messages[i].role != want:
            raise _field_error(
                where, f"messages[{i}].role", f"must be {want} (a conversation alternates user and assistant)"
            )


def _jsonl_entry(obj: Any, where: str, all_turns: bool) -> run_pb2.DatasetEntry:
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a JSON object")
    entry = run_pb2.DatasetEntry(max_tokens=_max_tokens(obj.get("max_tokens"), where))
    if "messages" in obj:
        entry.messages.extend(_messages(obj, where))
        users = [m.content for m in entry.messages if m.role == "user"]
        if all_turns:
            _check_alternation(list(entry.messages), where)
            entry.prompt = users[0]
        else:
            entry.prompt = "\n".join(users)
    elif "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"]:
            raise _field_error(where, "prompt", "must be a non-empty string")
        entry.prompt = obj["prompt"]
        if all_turns:
            entry.messages.add(role="user", content=entry.prompt)
    else:
        raise DatasetError(f'{where}: needs a field "prompt" (a non-empty string) or "messages" (a list)')
    return entry


def _iter_jsonl(data: bytes | Iterable[bytes], all_turns: bool) -> Iterator[run_pb2.DatasetEntry]:
    for where, obj in _json_lines(data):
        yield _jsonl_entry(obj, where, all_turns)


def _csv_int(row: dict[str, str], name: str, where: str, low: int, high: int) -> int:
    text = (row.get(name) or "").strip()
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise _field_error(where, name, f"must be an integer {low}..{high}")
    return value


def _iter_csv(data: bytes | Iterable[bytes], all_turns: bool) -> Iterator[run_pb2.DatasetEntry]:
    first = True
    for where, row in _csv_rows(data):
        if first:
            if "prompt" not in row:
                raise DatasetError(f'line 1: the header needs a "prompt" column (it has {", ".join(row) or "none"})')
            first = False
        prompt = row.get("prompt") or ""
        if not prompt.strip():
            raise _field_error(where, "prompt", "must be a non-empty string")
        entry = run_pb2.DatasetEntry(prompt=prompt)
        if (row.get("max_tokens") or "").strip():
            entry.max_tokens = _csv_int(row, "max_tokens", where, 1, MAX_TOKENS_LIMIT)
        system = row.get("system") or ""
        if system.strip():
            entry.messages.add(role="system", content=system)
        if system.strip() or all_turns:
            entry.messages.add(role="user", content=prompt)
        yield entry


def _sharegpt_entry(conv: Any, index: int, all_turns: bool) -> run_pb2.DatasetEntry | None:
    where = f"[{index}]"
    if not isinstance(conv, dict):
        raise DatasetError(f"{where}: expected a JSON object")
    turns = conv.get("conversations")
    if not isinstance(turns, list):
        raise _field_error(where, "conversations", "must be a list")
    if not all_turns:
        # As vLLM's benchmark: the first human turn is the prompt, the reply's length the output.
        if len(turns) < 2 or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns[:2]):
            return None
        prompt, reply = turns[0]["value"], turns[1]["value"]
        if turns[0].get("from") not in _SHAREGPT_USER or not prompt.strip():
            return None
        return run_pb2.DatasetEntry(prompt=prompt, max_tokens=_reply_tokens(reply))
    entry = run_pb2.DatasetEntry()
    rest = turns
    if rest and isinstance(rest[0], dict) and rest[0].get("from") == "system" and isinstance(rest[0].get("value"), str):
        entry.messages.add(role="system", content=rest[0]["value"])
        rest = rest[1:]
    pairs = 0
    for i in range(0, len(rest) - 1, 2):
        user, reply = rest[i], rest[i + 1]
        if not (isinstance(user, dict) and isinstance(reply, dict)):
            break
        if user.get("from") not in _SHAREGPT_USER or reply.get("from") not in _SHAREGPT_ASSISTANT:
            break
        if (
            not isinstance(user.get("value"), str)
            or not isinstance(reply.get("value"), str)
            or not user["value"].strip()
        ):
            break
        entry.messages.add(role="user", content=user["value"])
        entry.messages.add(role="assistant", content=reply["value"])
        if not pairs:
            entry.prompt = user["value"]
        pairs += 1
    return entry if pairs else None


def _json_list_items(data: bytes | Iterable[bytes]) -> Iterator[tuple[int, Any]]:
    """(index, value) of each element of a top-level JSON list, decoded incrementally."""
    decoder = json.JSONDecoder()
    chunks = iter(_as_chunks(data))
    text_decoder = codecs.getincrementaldecoder("utf-8")()
    buf = ""
    pos = 0
    lines_before = 0  # newlines in the text already dropped from buf
    eof = False

    def more(at_least: int) -> bool:
        nonlocal buf, pos, lines_before, eof
        if eof:
            return False
        lines_before += buf.count("\n", 0, pos)
        buf = buf[pos:]
        pos = 0
        target = len(buf) + at_least
        while len(buf) < target:
            try:
                chunk = next(chunks)
            except StopIteration:
                eof = True
                break
            try:
                buf += text_decoder.decode(bytes(chunk))
            except UnicodeDecodeError as exc:
                line = lines_before + buf.count("\n") + bytes(chunk)[: max(exc.start, 0)].count(b"\n") + 1
                raise DatasetError(f"line {line}: not valid UTF-8") from None
        if eof:
            try:
                buf += text_decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                raise DatasetError(f"line {lines_before + buf.count(chr(10)) + 1}: not valid UTF-8") from None
        return True

    def skip_ws() -> bool:
        """Skip whitespace; False at the end of the content."""
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf):
                return True
            if not more(1):
                return False

    def line_at(p: int) -> int:
        return lines_before + buf.count("\n", 0, p) + 1

    more(1)
    if buf.startswith("\ufeff"):
        pos = 1
    if not skip_ws():
        raise DatasetError("the file is empty")
    if buf[pos] != "[":
        raise DatasetError(f"line {line_at(pos)}: ShareGPT data must be a JSON list of conversations")
    pos += 1
    index = 0
    while True:
        if not skip_ws():
            raise DatasetError(f"line {line_at(pos)}: not valid JSON (the list is not closed)")
        if buf[pos] == "]" and index == 0:
            pos += 1
            break
        want = 64 * 1024
        while True:
            try:
                value, end = decoder.raw_decode(buf, pos)
                break
            except json.JSONDecodeError as exc:
                incomplete = exc.pos >= len(buf) - 1 or exc.msg.startswith("Unterminated string")
                if not incomplete or not more(want):
                    raise DatasetError(f"line {line_at(exc.pos)}: not valid JSON ({exc.msg})") from None
                want *= 2
            except (RecursionError, ValueError) as exc:
                raise DatasetError(f"[{index}]: {_unreadable(exc)}") from None
        pos = end
        yield index, value
        index += 1
        if not skip_ws():
            raise DatasetError(f"line {line_at(pos)}: not valid JSON (the list is not closed)")
        if buf[pos] == ",":
            pos += 1
            continue
        if buf[pos] == "]":
            pos += 1
            break
        raise DatasetError(f"line {line_at(pos)}: not valid JSON (expected , or ] after element {index - 1})")
    if skip_ws():
        raise DatasetError(f"line {line_at(pos)}: not valid JSON (extra data after the list)")


def _iter_sharegpt(data: bytes | Iterable[bytes], all_turns: bool) -> Iterator[run_pb2.DatasetEntry]:
    for index, conv in _json_list_items(data):
        entry = _sharegpt_entry(conv, index, all_turns)
        if entry is not None:
            yield entry


def iter_entries(fmt: int, data: bytes | Iterable[bytes], *, all_turns: bool = False) -> Iterator[run_pb2.DatasetEntry]:
    """The entries of a prompt dataset (JSONL, ShareGPT, CSV) in file order, read incrementally.
    Raises DatasetError (naming the line and the field) at the first bad entry."""
    if fmt == run_pb2.DATASET_FORMAT_JSONL:
        return _iter_jsonl(data, all_turns)
    if fmt == run_pb2.DATASET_FORMAT_SHAREGPT:
        return _iter_sharegpt(data, all_turns)
    if fmt == run_pb2.DATASET_FORMAT_CSV:
        return _iter_csv(data, all_turns)
    raise DatasetError(f"format {format_name(fmt)} has no prompt entries (jsonl, sharegpt or csv)", "format")


def entry_words(entry: run_pb2.DatasetEntry) -> int:
    """Words of an entry's prompt (all its messages' words when it has messages)."""
    if entry.messages:
        return sum(len(m.content.split()) for m in entry.messages)
    return len(entry.prompt.split())


def parse_entries(
    fmt: int,
    data: bytes | Iterable[bytes],
    *,
    all_turns: bool = False,
    min_prompt_words: int = 0,
    max_prompt_words: int = 0,
) -> list[run_pb2.DatasetEntry]:
    """The entries kept by the word filters (0: no bound). DatasetError when the file is bad or
    no entry is left."""
    if max_prompt_words and min_prompt_words > max_prompt_words:
        raise DatasetError("min_prompt_words exceeds max_prompt_words", "min_prompt_words")
    high = max_prompt_words or 2**62
    parsed = 0
    kept = []
    for entry in iter_entries(fmt, data, all_turns=all_turns):
        parsed += 1
        if min_prompt_words <= entry_words(entry) <= high:
            kept.append(entry)
    if not kept:
        raise DatasetError(f"no usable entries ({parsed} parsed, none left after the length filter)")
    return kept


def conversation_turns(entry: run_pb2.DatasetEntry) -> tuple[str, list[ConversationTurn]]:
    """(system prompt or "", turns) of an `all_turns` entry (see the module's docstring). A
    prompt entry without messages is one turn."""
    if not entry.messages:
        return "", [ConversationTurn(entry.prompt, entry.max_tokens)]
    messages = list(entry.messages)
    system = ""
    if messages[0].role == "system":
        system = messages[0].content
        messages = messages[1:]
    turns = []
    for i in range(0, len(messages), 2):
        reply = messages[i + 1].content if i + 1 < len(messages) else None
        max_tokens = _reply_tokens(reply) if reply is not None else entry.max_tokens
        turns.append(ConversationTurn(messages[i].content, max_tokens))
    return system, turns


# --- traces ----------------------------------------------------------------------------------


def _trace_int(obj: dict[str, Any], name: str, where: str) -> int:
    value = obj.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 100_000_000:
        raise _field_error(where, name, "must be an integer 1..100000000")
    return int(value)


def _iter_mooncake(data: bytes | Iterable[bytes], block_tokens: int) -> Iterator[tuple[str, float, TraceRequest]]:
    for where, obj in _json_lines(data):
        if not isinstance(obj, dict):
            raise DatasetError(f"{where}: expected a JSON object")
        ts = obj.get("timestamp")
        if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts) or ts < 0:
            raise _field_error(where, "timestamp", "must be a number of milliseconds >= 0")
        input_length = _trace_int(obj, "input_length", where)
        output_length = _trace_int(obj, "output_length", where)
        ids = obj.get("hash_ids", [])
        if not isinstance(ids, list) or not all(_is_int(i) and i >= 0 for i in ids):
            raise _field_error(where, "hash_ids", "must be a list of integers >= 0")
        if block_tokens and len(ids) > -(-input_length // block_tokens):
            raise _field_error(
                where,
                "hash_ids",
                f"{len(ids)} ids for {input_length} tokens; at most {-(-input_length // block_tokens)}"
                f" blocks of {block_tokens} tokens",
            )
        yield where, float(ts), TraceRequest(float(ts), input_length, output_length, tuple(ids))


_AZURE_TIME = re.compile(r"(\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2})(?:\.(\d{1,12}))?\s*(Z|[+-]\d{2}:?\d{2})?")


def _azure_time_ms(text: str, where: str) -> float:
    m = _AZURE_TIME.fullmatch(text.strip())
    if m is None:
        raise _field_error(
            where, "TIMESTAMP", f"{text.strip()!r} is not a date and time like 2023-11-16 18:15:46.6805900"
        )
    zone = m.group(3) or "+00:00"
    try:
        base = datetime.fromisoformat(m.group(1).replace(" ", "T") + ("+00:00" if zone == "Z" else zone))
    except ValueError:
        raise _field_error(where, "TIMESTAMP", f"{text.strip()!r} is not a valid date and time") from None
    if base.tzinfo is None:  # pragma: no cover - the zone is always given above
        base = base.replace(tzinfo=UTC)
    fraction = m.group(2) or ""
    ms = base.timestamp() * 1000.0
    if fraction:
        ms += int(fraction) / 10 ** len(fraction) * 1000.0
    return ms


def _iter_azure(data: bytes | Iterable[bytes]) -> Iterator[tuple[str, float, TraceRequest]]:
    first = True
    for where, row in _csv_rows(data):
        if first:
            missing = [c for c in ("TIMESTAMP", "ContextTokens", "GeneratedTokens") if c not in row]
            if missing:
                raise DatasetError(
                    f"line 1: the header needs the columns TIMESTAMP, ContextTokens, GeneratedTokens"
                    f" (missing {', '.join(missing)})"
                )
            first = False
        ms = _azure_time_ms(row.get("TIMESTAMP") or "", where)
        input_length = _csv_int(row, "ContextTokens", where, 1, 100_000_000)
        output_length = _csv_int(row, "GeneratedTokens", where, 1, 100_000_000)
        yield where, ms, TraceRequest(ms, input_length, output_length, ())


def iter_trace(fmt: int, data: bytes | Iterable[bytes], *, block_tokens: int = 0) -> Iterator[TraceRequest]:
    """The requests of a trace in order, times relative to the first, read incrementally."""
    if fmt == run_pb2.DATASET_FORMAT_MOONCAKE_TRACE:
        rows = _iter_mooncake(data, block_tokens)
    elif fmt == run_pb2.DATASET_FORMAT_AZURE_TRACE:
        rows = _iter_azure(data)
    else:
        raise DatasetError(f"format {format_name(fmt)} is not a trace (mooncake or azure)", "format")
    origin: float | None = None
    previous = -math.inf
    time_field = "timestamp" if fmt == run_pb2.DATASET_FORMAT_MOONCAKE_TRACE else "TIMESTAMP"
    for where, ms, request in rows:
        if ms < previous:
            raise _field_error(where, time_field, "earlier than the previous request's (a trace must be in time order)")
        previous = ms
        if origin is None:
            origin = ms
        yield TraceRequest(ms - origin, request.input_length, request.output_length, request.hash_ids)


def parse_trace(fmt: int, data: bytes, *, block_tokens: int = 0) -> list[TraceRequest]:
    """Every request of a Mooncake or Azure trace (see the module's docstring); DatasetError,
    naming the line and the field, when the trace is bad or empty. With `block_tokens`, a
    Mooncake request may not have more hash ids than blocks."""
    requests = list(iter_trace(fmt, data, block_tokens=block_tokens))
    if not requests:
        raise DatasetError("the trace has no requests")
    return requests


# --- any format ------------------------------------------------------------------------------


def validate(fmt: int, data: bytes | Iterable[bytes]) -> Summary:
    """Reads a whole dataset of any format as the agents will, returning what it holds, or
    DatasetError. Prompt datasets are read as single prompts (`all_turns` is a run's choice)."""
    if fmt in PROMPT_FORMATS:
        count = sum(1 for _ in iter_entries(fmt, data))
        if not count:
            raise DatasetError("no usable entries")
        return Summary(count)
    if fmt in TRACE_FORMATS:
        count = 0
        last = 0.0
        for request in iter_trace(fmt, data):
            count += 1
            last = request.timestamp_ms
        if not count:
            raise DatasetError("the trace has no requests")
        return Summary(count, last / 1000.0)
    if fmt in TOKENIZER_FORMATS:
        from common.tokenizer import Tokenizer, TokenizerError

        content = b"".join(_as_chunks(data))
        try:
            Tokenizer(content)
        except TokenizerError as exc:
            raise DatasetError(str(exc)) from None
        return Summary(0)
    raise DatasetError(
        "required: one of DATASET_FORMAT_JSONL, _SHAREGPT, _CSV, _MOONCAKE_TRACE, _AZURE_TRACE, _TOKENIZER", "format"
    )
