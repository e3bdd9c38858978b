"""The text of a growing list of tokens, decoding only its last few tokens at each new one.

Decoding the whole list at every token makes a generation of n tokens cost O(n^2): every
token sends the list to the host, which decodes it and sends back the whole text. Here each
decode covers the tokens since the text was last committed (at most about WINDOW) plus CONTEXT
tokens before them, decoded again so the tokenizer sees that boundary as it does in the whole
list (a leading space it strips at the start of a decode, bytes of a character split between
tokens); the context's own text is cut off the front. Where that text is not what the window
starts with (a tokenizer that rewrites across the boundary), the whole list is decoded, as before.
"""

WINDOW = 16  # tokens past the committed text before it moves up (one extra decode each time)
CONTEXT = 4  # tokens before the window decoded with it


class IncrementalText:
    def __init__(self, decode):
        """`decode(tokens) -> str`: the model's detokenizer (the host's model.decode)."""
        self._decode = decode
        self.tokens = []
        self.text = ""
        self._start = 0  # tokens[:start] have the committed text
        self._committed = ""
        self._context = 0  # the window's decode starts here
        self._context_text = ""  # decode(tokens[context:start])

    def append(self, token: int) -> str:
        """Add a token; returns the whole text so far (a trailing U+FFFD while a character is incomplete)."""
        self.tokens.append(token)
        window = self._decode(self.tokens[self._context:])
        if window.startswith(self._context_text):
            self.text = self._committed + window[len(self._context_text):]
        else:
            self.text = self._decode(self.tokens)
            self._start = self._context = 0
            self._committed = self._context_text = ""
        if len(self.tokens) - self._start >= WINDOW and not self.text.endswith("\ufffd"):
            self._start = len(self.tokens)
            self._committed = self.text
            self._context = max(0, self._start - CONTEXT)
            self._context_text = self._decode(self.tokens[self._context:self._start])
        return self.text


def held_back(text: str, stop_strings) -> int:
    """How many trailing characters could begin a stop string (not yet safe to show)."""
    held = 0
    for s in stop_strings:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                held = max(held, k)
                break
    return held
