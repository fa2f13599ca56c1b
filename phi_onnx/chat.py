"""Multi-turn conversations that keep their images and their KV cache.

A conversation keeps its generator alive between turns (:mod:`phi_onnx.sessions`): a follow-up turn without new images
is appended to it, so only that turn's tokens are prefilled. A turn that adds images, that does not fit in what the
generator has left, or that follows an answer cut by a stop string encodes the whole history again (earlier images'
features come from the feature cache). Earlier images stay in the conversation and ``<|image_N|>`` tags are numbered
over all of it. Each image keeps the num_crops it was first sent with (16 when it is the conversation's only image, 4
once there are several, or the ``num_crops`` option of its turn), so a later image never changes how an earlier one is
seen.
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from phi_onnx.errors import PromptError
from phi_onnx.generation import Chunk, Generation, collect
from phi_onnx.images import ImageInput, load_frames
from phi_onnx.options import GenerationOptions
from phi_onnx.sessions import SessionPool

if TYPE_CHECKING:
    from phi_onnx.model import PhiVision


class Chat:
    """A conversation with a model. Images are decoded once, when added, and kept for later turns.

    Example:
        >>> chat = model.chat()
        >>> chat.send("What is in this picture?", images=["dog.jpg"]).text
        >>> chat.send("And what colour is it?").text
    """

    def __init__(self, model: PhiVision, system: str | None = None, options: GenerationOptions | None = None) -> None:
        self.model = model
        self.options = options or model.options
        self.system = system
        self.messages: list[dict[str, Any]] = []
        self.pending: list[Any] = []
        # This conversation's own generator, never evicted by other traffic.
        self._live = SessionPool(1, 2**62, owned=True)
        self._open: Generator[Chunk, None, None] | None = None  # the last turn's stream (open while it has a frame)
        self._open_thread = 0

    @property
    def image_count(self) -> int:
        """Images in the conversation so far (pending ones included)."""
        done = sum(1 for m in self.messages for p in _parts(m) if p.get("type") == "image")
        return done + len(self.pending)

    @property
    def kv_bytes(self) -> int:
        """KV-cache memory the conversation's live generator holds (0 when none is alive)."""
        return self._live.nbytes

    def add_image(self, image: ImageInput) -> int:
        """Attach an image (or the frames of an animation / folder) to the next user turn; returns frames added."""
        frames = self._decode(image)
        self.pending.extend(frames)
        return len(frames)

    def reset(self) -> None:
        """Forget the history, pending images and the live generator (the system prompt stays)."""
        self.messages.clear()
        self.pending.clear()
        self._live.clear()

    def stream(self, text: str, images: Sequence[ImageInput] = (), **option_values: Any) -> Iterator[Chunk]:
        """Send a user turn and stream the answer.

        Input is checked (images decoded, prompt tokenised, budget checked) before this returns, so bad input raises
        here and leaves the conversation exactly as it was. The turn joins the history only once the answer is
        complete; an answer abandoned half-way is not kept, and starting the next turn abandons an unfinished one. A
        Chat is one conversation: turns from two threads at once are refused.
        """
        import time

        from phi_onnx.model import CROPS

        start = time.perf_counter()
        if self._open is not None and self._open.gi_frame is not None:  # not finished, closed or abandoned yet
            if self._open_thread != threading.get_ident():
                raise PromptError(
                    "this Chat is answering a turn in another thread: a Chat is one conversation, so wait for that "
                    "answer, or give each thread its own Chat"
                )
            self._open.close()  # an unfinished turn of this thread's is abandoned: it never joins the history
        opts = self.options.updated(option_values) if option_values else self.options
        new = [frame for image in images for frame in self._decode(image)]
        frames = [*self.pending, *new]
        # An image's crops are fixed when it first goes to the model and kept for the rest of the conversation, so
        # the model never sees an image it already described at another resolution.
        unmarked = [f for f in frames if CROPS not in f.info]
        crops = opts.crops_for(self.image_count + len(new))
        for frame in unmarked:
            frame.info[CROPS] = crops
        content: list[dict[str, Any]] = [{"type": "image", "image": f} for f in frames]
        content.append({"type": "text", "text": text})
        user = {"role": "user", "content": content}
        history = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        try:
            chunks = self.model._stream(start, opts, self._live, None, (), [*history, user], None)
        except BaseException:
            for frame in unmarked:
                del frame.info[CROPS]
            raise
        self._open = self._record(chunks, user)
        self._open_thread = threading.get_ident()
        return self._open

    def _record(self, chunks: Iterator[Chunk], user: dict[str, Any]) -> Generator[Chunk, None, None]:
        parts: list[str] = []
        for chunk in chunks:
            parts.append(chunk.text)
            if chunk.finish_reason is not None:  # recorded before the last chunk goes out: a caller may stop there
                self.messages.append(user)
                self.messages.append({"role": "assistant", "content": "".join(parts)})
                self.pending = []
            yield chunk

    def _decode(self, image: ImageInput) -> list:
        from phi_onnx.model import DECODED

        frames = load_frames(image, max_frames=self.model.max_frames, sampling=self.model.frame_sampling)
        for frame in frames:
            frame.info[DECODED] = True  # decoded once; later turns reuse the object (and its cached HD transform)
        return frames

    def send(self, text: str, images: Sequence[ImageInput] = (), **option_values: Any) -> Generation:
        """Send a user turn and return the whole answer."""
        return collect(self.stream(text, images, **option_values))


def _parts(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message.get("content")
    return content if isinstance(content, list) else []
