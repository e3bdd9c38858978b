"""Drafters for Context.generate_speculative (history -> guessed next tokens), and the run-length
mask rows Context.write takes."""


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


class JacobiDrafter:
    """Jacobi decoding as a drafter: guess n tokens; next round, guess what the model said at the
    guesses it rejected (a round's outputs past the first miss), padded by repeating the last
    token. Where the guesses reach a fixed point, several tokens come out of one pass."""

    def __init__(self, n: int = 4):
        self.n, self.guess = n, []

    def __call__(self, history):
        guess = self.guess[:self.n]
        pad = guess[-1] if guess else history[-1]
        return guess + [pad] * (self.n - len(guess))

    def verified(self, outputs):
        self.guess = list(outputs)  # the first follows the correction, at the first rejected guess's slot


def runs_attending(length: int, visible) -> list:
    """A mask row for Context.write: run lengths (attend, skip, attend, ...) over `length` slots
    attending to the [start, end) ranges in `visible` only."""
    seen = [False] * length
    for start, end in visible:
        if not 0 <= start <= end <= length:
            raise ValueError(f"range [{start}, {end}) is outside the {length} slots")
        seen[start:end] = [True] * (end - start)
    runs, current, count = [], True, 0
    for attend in seen:
        if attend != current:
            runs.append(count)
            current, count = attend, 0
        count += 1
    return runs + [count]
