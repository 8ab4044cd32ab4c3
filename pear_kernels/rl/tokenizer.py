"""A character-level tokenizer with a tiny fixed vocabulary, built locally (no downloads).

The tasks in ``rl.tasks`` are written in a handful of characters, so one id per character
keeps behavior log-probs exactly aligned with model tokens: a trace's i-th character *is*
its i-th token, which removes the off-by-one tokenization pitfall (docs/pear_math.md) by design.
"""

from __future__ import annotations

from typing import Iterable, List, Sequence

__all__ = ["CharTokenizer"]


class CharTokenizer:
    """Maps characters to ids. Id 0 is padding, id 1 begins every sequence.

    ``eos`` is an ordinary character of the vocabulary (the task's end marker), so the model
    learns to emit it like any other token.
    """

    PAD, BOS = "<pad>", "<bos>"

    def __init__(self, alphabet: Iterable[str], eos: str):
        chars: List[str] = []
        for ch in alphabet:
            if len(ch) != 1:
                raise ValueError(f"alphabet must hold single characters, got {ch!r}")
            if ch not in chars:
                chars.append(ch)
        if eos not in chars:
            raise ValueError(f"eos {eos!r} must be in the alphabet")
        self.itos: List[str] = [self.PAD, self.BOS] + chars
        self.stoi = {ch: i for i, ch in enumerate(self.itos)}
        self.pad_id, self.bos_id = 0, 1
        self.eos = eos
        self.eos_id = self.stoi[eos]

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> List[int]:
        try:
            return [self.stoi[ch] for ch in text]
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids: Sequence[int], stop_at_eos: bool = True) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i in (self.pad_id, self.bos_id):
                continue
            ch = self.itos[i]
            out.append(ch)
            if stop_at_eos and i == self.eos_id:
                break
        return "".join(out)
