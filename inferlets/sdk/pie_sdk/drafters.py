"""Drafters for Context.generate_speculative: history -> guessed next tokens."""


def ngram_drafter(n: int = 2, k: int = 4):
    """A drafter guessing that the text repeats: after the last n tokens' previous occurrence,
    propose the k tokens that followed it (prompt lookup decoding)."""

    def draft(history):
        if len(history) <= n:
            return []
        tail = history[-n:]
        for start in range(len(history) - n - 1, -1, -1):
            if history[start:start + n] == tail:
                return history[start + n:start + n + k]
        return []

    return draft
