"""Token ids -> text, one token at a time, with stop strings.

Decoding a token on its own loses context: SentencePiece drops the space a word starts with,
and a multi-byte character split over tokens decodes as U+FFFD until its last byte arrives.
So each step decodes a short window (``prefix`` ... end) and emits only what grew past the
window's earlier text, and nothing while the text ends in an incomplete character.

Stop strings (OpenAI semantics: the stop string itself is not returned) may span tokens, so
text that could be the start of a stop string is held back until it is known not to be one.
"""

from __future__ import annotations

_CONTEXT = 5  # prompt tokens decoded before the first output token, for the leading space
_INCOMPLETE = "\ufffd"


class Detokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-_CONTEXT:])
        self.prefix = 0  # window start in self.ids
        self.read = len(self.ids)  # first id whose text has not been emitted into self.text
        self.stop = tuple(s for s in stop if s)
        self.text = ""  # all output text so far (cut at a stop string once one is found)
        self.sent = 0  # characters of self.text already handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        # clean_up_tokenization_spaces would strip spaces before punctuation in BPE text
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Feed one generated token; -> text safe to emit now (maybe empty)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith(_INCOMPLETE):
            old_len = len(self.text)
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
            self._find_stop(old_len)
        return self._release(final=self.stopped)

    def _find_stop(self, old_len: int) -> None:
        for s in self.stop:
            i = self.text.find(s, max(0, old_len - len(s) + 1))
            if i >= 0:
                self.text = self.text[:i]
                self.stopped = True
                return

    def _held(self) -> int:
        """Length of the longest tail of the text that starts some stop string."""
        held = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), held, -1):
                if self.text.endswith(s[:n]):
                    held = n
                    break
        return held

    def _release(self, final: bool) -> str:
        end = len(self.text) if final else len(self.text) - self._held()
        out = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

    def flush(self) -> str:
        """At the end of generation: whatever was held back (not part of a stop string)."""
        return self._release(final=True)
