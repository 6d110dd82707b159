"""Request-body fields that llm-loadtest sets itself.

`Target.extra_body` can add parameters to every request but never replace these: the
controller rejects a spec that tries (INVALID_ARGUMENT), and the agent drops them as a second
line of defence. `max_completion_tokens` is OpenAI's newer name for `max_tokens` and wins over
it on servers that know both, so letting it through would change the requested length.
"""

PROTECTED_BODY_KEYS = frozenset(
    {"model", "messages", "prompt", "stream", "stream_options", "max_tokens", "max_completion_tokens"}
)
