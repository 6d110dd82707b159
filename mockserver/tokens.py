"""How the mock counts tokens: whitespace words, or a real tokenizer (`mock-server --tokenizer`).

A `TokenModel` turns the text of a request into prompt tokens and names the words the mock
generates:

* Without a tokenizer a token is a whitespace-separated word, and the output words are
  `generation.VOCABULARY` (" the", " of", ...), one word each.
* With a tokenizer (`common.tokenizer.Tokenizer`: a `tokenizer.json` or a model directory)
  prompt text is counted with it (special tokens excluded), and the output words are chosen
  from its vocabulary: eight space-prefixed alphabetic words that are exactly one token each
  *and* stay one token each when concatenated, checked at start-up. So a client that counts
  the streamed text with the same tokenizer gets exactly `usage.completion_tokens`. A
  tokenizer without such words (e.g. a SentencePiece model that merges a leading space
  differently) is refused with an error rather than served with counts that disagree.

The template overhead a real server adds is configured, not guessed: `bos_tokens` at the
start of every prompt given as text (chat and text completions; a completions prompt of
token ids is taken as is, as vLLM does), and for chat `chat_template_tokens` around every
message (its role header) and once more at the end (the generation prompt, which is the
assistant's header). So

    chat prompt_tokens       = bos + sum(message tokens) + chat_template_tokens x (messages + 1)
    completion prompt_tokens = bos + prompt tokens

`items` renders a prompt as the sequence the prefix cache hashes (`mockserver.prefix_cache`):
token ids (or words) of the text, with distinct markers for the BOS and the role headers, so
that a conversation's next turn, which repeats the history and the server's own reply after
an assistant header, shares its prefix with the previous turn's prompt and reply.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from common.tokenizer import Tokenizer

VOCABULARY_WORDS = 8

# Marker items of the rendered prompt: tuples, so they never equal a token id or a word.
_BOS = "\x00bos"
_HEADER = "\x00header"


class TokenModel:
    """Counts prompts and renders them for the prefix cache; names the output words.

    Attributes:
        tokenizer: The tokenizer (None: whitespace words).
        vocabulary: The output words, each one token (with its leading space).
        vocabulary_items: The token of each output word (its id, or the word itself).
    """

    def __init__(
        self,
        tokenizer: Tokenizer | None = None,
        *,
        bos_tokens: int = 0,
        chat_template_tokens: int = 0,
        default_vocabulary: Sequence[str] = (),
    ) -> None:
        self.tokenizer = tokenizer
        self.bos_tokens = bos_tokens
        self.chat_template_tokens = chat_template_tokens
        if tokenizer is None:
            self.vocabulary = tuple(default_vocabulary)
            self.vocabulary_items: tuple[Hashable, ...] = tuple(w.strip() for w in self.vocabulary)
        else:
            words, ids = single_token_words(tokenizer)
            self.vocabulary, self.vocabulary_items = words, ids

    # --- counting --------------------------------------------------------------------------

    def count_texts(self, texts: Sequence[str]) -> int:
        """Tokens of the texts, each counted on its own."""
        if self.tokenizer is None:
            return sum(len(t.split()) for t in texts)
        if not texts:
            return 0
        return sum(self.tokenizer.count_many(texts))

    def chat_overhead(self, messages: int) -> int:
        """Tokens the template adds to a chat request of `messages` messages."""
        return self.bos_tokens + self.chat_template_tokens * (messages + 1)

    # --- rendering -------------------------------------------------------------------------

    def text_items(self, text: str) -> list[Hashable]:
        """The tokens of `text`: ids with a tokenizer, else its words."""
        if self.tokenizer is None:
            return list(text.split())
        return list(self.tokenizer.encode(text))

    def bos_items(self) -> list[Hashable]:
        return [(_BOS, i) for i in range(self.bos_tokens)]

    def header_items(self, role: str) -> list[Hashable]:
        """A message's role header (the generation prompt is the assistant's)."""
        return [(_HEADER, role, i) for i in range(self.chat_template_tokens)]

    def output_items(self, start: int, tokens: int) -> list[Hashable]:
        """The tokens of output tokens `start` to `start + tokens`."""
        size = len(self.vocabulary_items)
        return [self.vocabulary_items[i % size] for i in range(start, start + tokens)]


def single_token_words(tokenizer: Tokenizer) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """`VOCABULARY_WORDS` words of the tokenizer's vocabulary that are one token each, alone
    and concatenated in every order the output cycles through; raises ValueError if there are
    not enough of them."""
    words: list[str] = []
    ids: list[int] = []
    seen: set[str] = set()
    for token_id in range(tokenizer.vocab_size):
        text = tokenizer.decode([token_id])
        # Space-prefixed lowercase words of 2+ letters: readable, and split apart by every
        # pre-tokenizer that splits on spaces.
        word = text[1:]
        if not (text.startswith(" ") and len(word) >= 2 and word.isascii() and word.isalpha() and word.islower()):
            continue
        if text in seen or tokenizer.encode(text) != [token_id]:
            continue
        seen.add(text)
        words.append(text)
        ids.append(token_id)
        if len(words) == VOCABULARY_WORDS:
            break
    if len(words) < 2:
        raise ValueError(
            f"the tokenizer has too few space-prefixed words that are one token each ({len(words)}); "
            "the mock needs such words to generate text of a known token count"
        )
    # The output cycles through the words; two cycles cover every neighbouring pair.
    text = "".join(words * 2)
    if tokenizer.encode(text) != ids * 2:
        raise ValueError(
            "the tokenizer merges the mock's output words across their boundaries "
            f"({tokenizer.count(text)} tokens for {2 * len(words)} words); it cannot count the mock's output exactly"
        )
    return tuple(words), tuple(ids)


def load_token_model(path: str, *, bos_tokens: int = 0, chat_template_tokens: int = 0) -> TokenModel:
    """The token model of a tokenizer file or model directory; raises ValueError."""
    return TokenModel(Tokenizer.from_path(path), bos_tokens=bos_tokens, chat_template_tokens=chat_template_tokens)
