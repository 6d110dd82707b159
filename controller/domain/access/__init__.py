"""Access: who may call, how often, and where a run may send traffic (docs/security.md).

* `keys.py`: API keys and their roles; `audit.py`: the audit log of every mutating call.
* `ratelimit.py`: per-caller token buckets.
* `secrets.py`: the target's credentials, kept out of the stored spec and given only to agents.
* `destinations.py`: the allow-list of target and scrape destinations.
"""
