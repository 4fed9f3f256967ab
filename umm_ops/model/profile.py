"""Conventions profiles: how prompts, images and the sampler are laid out around the same network.

Two profiles, chosen by ``CheersConfig.profile`` (saved in ``config.json``; ``model.profile`` holds the object):

``"umm"`` (the default: this project's own conventions, for models trained from scratch here)
    raw prompts (no chat template unless the caller writes one), images wrapped as ``<|vision_start|>``
    ``<|image_pad|>``*n ``<|vision_end|>``, CFG null prompt ``<|pad|>``, no dummy image, Euler on
    ``time_shift(linspace(0, 1, steps + 1), a)``, pixels in [-1, 1], square resize of images to understand.

``"cheers"`` (the released Cheers checkpoint, AI9Stars/Cheers; ``from_cheers_checkpoint`` selects it)
    * chat template with the default system turn (Training/cheers_config/tokenizer_config.json ``chat_template``):
      ``<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n{prompt}<|im_end|>\\n``
      ``<|im_start|>assistant\\n`` (Inference/T2I.py, I2T.py, T2T.py: ``add_generation_prompt=True``);
    * the five tokens the released processor adds to Qwen2.5's vocabulary, in this order: ``<image>``,
      ``<image_gen>``, ``<im_start>``, ``<im_end>``, ``<no_mean>`` = ids 151665..151669 (processing_umm.py
      ``UMMProcessor.__init__``; modeling_umm.py ``IM_START_ID`` / ``IM_END_ID`` / ``NO_MEAN_ID``); an image is
      ``<im_start>`` [its tokens] ``<im_end>`` and a text-to-image prompt ends with ``<im_start>``
      (``add_im_start_id=True``);
    * CFG null prompt: every id except ``<im_start>``, ``<im_end>`` and image placeholders -> ``<no_mean>``
      (modeling_umm.py ``Cheers._build_uncond_full_ids``);
    * a prompt without an image gets a dummy image in front of it (processing_umm.py ``__call__``: uniform random
      uint8 256 x 256 RGB, ``np.random.randint``; modeling_umm.py ``prepare_inputs_labels_for_multimodal``: its
      features first, causal, no wrapper tokens, t = 1), in both CFG branches and for text-only chat; its resolution
      sets the generated image's (``Cheers.generate``: ``grid_hws[0]``);
    * sampler: v at the N points ``time_shift(linspace(0, 1, N), a)``, N - 1 Euler steps, then ``x + v(1) / N``
      (``Cheers.generate``); CFG ``v_u + s (v_c - v_u)``;
    * pixels in [0, 1] (image_processing_umm.py: ``rescale(1 / 255)``, no normalisation), decoded images clamped to
      [0, 1] (Inference/T2I.py);
    * images to understand: the long side resized to the model's size (bicubic), centred on a black square
      (image_processing_umm.py ``_preprocess_und``);
    * training labels: ``<im_start>`` after a prompt is a target, ``<im_end>`` after an image never is
      (modeling_umm.py ``Cheers.forward``: IM_START_ID kept in the labels, IM_END_ID dropped); the packer's
      ``label_image_start``;
    * training on a sample without any image: a black image of the model's size in front of it, generated at
      t = 0 (pure noise in, flow target x1 - noise, its head output in the image loss), causal, no wrapper tokens
      (Training/tasks/omni/train_cheers.py ``process_sample``: ``np.zeros((512, 512, 3))`` through the
      understanding preprocessing, ``t = [0.0]``; modeling_umm.py ``prepare_inputs_labels_for_multimodal`` puts its
      features first with a zero image mask, ``Cheers.forward`` runs the head on the first image-sized block when
      the labels hold no ``<im_start>``); the packer's ``PackSpec.text_only_image``.

A profile is a frozen dataclass: ``dataclasses.replace(model.profile, dummy_image=False)`` switches one convention.

Batches: the released code right-pads a batch of prompts and its image tokens then also see the padding of the
shorter prompts; here prompts are packed without padding, so a batch equals the released outputs prompt by prompt
(what the released code gives at batch size 1 or for prompts of one length).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

__all__ = ["Profile", "PROFILES", "get_profile", "CHEERS_TOKENS", "CHEERS_TOKEN_IDS", "letterbox", "square_resize",
           "dummy_image", "to_profile_range"]

CHEERS_TOKENS = ("<image>", "<image_gen>", "<im_start>", "<im_end>", "<no_mean>")
CHEERS_TOKEN_IDS = (151665, 151666, 151667, 151668, 151669)   # after Qwen2.5's 151665 ids, in the order above
SAMPLERS = ("euler", "cheers")
PREPROCESS = ("square", "letterbox")


@dataclass(frozen=True)
class Profile:
    name: str
    image_start: str               # token before an image's span (a text-to-image prompt ends with it)
    image_end: str                 # token after an image's span
    image_pad: str                 # placeholder id at the image's positions (replaced by its features)
    null_token: str | None         # CFG null prompt token; None: the tokenizer's pad token
    system_prompt: str | None      # default system turn of the chat template; None: none
    chat: bool                     # generate_* wrap str / Sample prompts in the chat template by default
    added_tokens: tuple            # tokens the tokenizer must hold (added in this order when none are present)
    added_token_ids: tuple | None  # their required ids (None: whatever the tokenizer gives)
    dummy_image: bool              # prompts without an image get a dummy image in front (understanding, causal)
    dummy_source_size: int         # side of the random square drawn for the dummy before its resize
    sampler: str                   # "euler" (N Euler steps) or "cheers" (N points, N-1 Euler steps + x + v(1)/N)
    pixel_range: tuple             # (lo, hi) of pixels in and out
    preprocess: str                # images to understand from files: "square" resize or "letterbox"
    label_image_start: bool        # training labels: the start token of a generated image is a target
    text_only_image: bool          # training: a sample without images gets a black image at t = 0 in front
    # RoPE inverse frequencies (LLM and flow head) rounded to the model dtype, as the released inference scripts'
    # model.to(torch.bfloat16) rounds transformers' inv_freq buffers (the identity in float32)
    rope_inv_freq_in_model_dtype: bool = False

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"Profile.sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.preprocess not in PREPROCESS:
            raise ValueError(f"Profile.preprocess must be one of {PREPROCESS}, got {self.preprocess!r}")
        if tuple(self.pixel_range) not in ((-1.0, 1.0), (0.0, 1.0)):
            raise ValueError(f"Profile.pixel_range must be (-1.0, 1.0) or (0.0, 1.0), got {self.pixel_range!r}")
        if self.added_token_ids is not None and len(self.added_token_ids) != len(self.added_tokens):
            raise ValueError(f"Profile.added_token_ids must give one id per added token ({len(self.added_tokens)}), "
                             f"got {self.added_token_ids!r}")

    @property
    def keep_in_null_prompt(self) -> tuple:
        return (self.image_start, self.image_end, self.image_pad)

    def check_pixels(self, x: torch.Tensor, who: str) -> None:
        lo, hi = self.pixel_range
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{who}: expected a floating image tensor with values in [{lo:g}, {hi:g}] (profile "
                            f"{self.name!r}), got {type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")
        mn, mx = float(x.min()), float(x.max())
        if not (lo <= mn and mx <= hi):
            raise ValueError(f"{who}: image values must lie in [{lo:g}, {hi:g}] (profile {self.name!r}), got min "
                             f"{mn:.4g} max {mx:.4g}")


PROFILES = {
    "umm": Profile(name="umm", image_start="<|vision_start|>", image_end="<|vision_end|>", image_pad="<|image_pad|>",
                   null_token=None, system_prompt=None, chat=False, added_tokens=(), added_token_ids=None,
                   dummy_image=False, dummy_source_size=256, sampler="euler", pixel_range=(-1.0, 1.0),
                   preprocess="square", label_image_start=False, text_only_image=False),
    "cheers": Profile(name="cheers", image_start="<im_start>", image_end="<im_end>", image_pad="<image>",
                      null_token="<no_mean>", system_prompt="You are a helpful assistant.", chat=True,
                      added_tokens=CHEERS_TOKENS, added_token_ids=CHEERS_TOKEN_IDS, dummy_image=True,
                      dummy_source_size=256, sampler="cheers", pixel_range=(0.0, 1.0), preprocess="letterbox",
                      label_image_start=True, text_only_image=True, rope_inv_freq_in_model_dtype=True),
}


def get_profile(profile) -> Profile:
    """A Profile from its name ("umm" / "cheers") or the Profile itself."""
    if isinstance(profile, Profile):
        return profile
    if profile not in PROFILES:
        raise ValueError(f"unknown conventions profile {profile!r}: expected one of {sorted(PROFILES)}")
    return PROFILES[profile]


def profile_names() -> list:
    return sorted(PROFILES)


# ------------------------------------------------------------------------------------------------ images
def _pil(image):
    from ..utils import optional_import

    Image = optional_import("PIL", "Image")

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    import numpy as np

    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return Image.fromarray(image)
    raise TypeError(f"expected a PIL image or a uint8 (H, W, 3) array, got {type(image).__name__}")


def _to_tensor(im) -> torch.Tensor:
    import numpy as np

    a = np.asarray(im, dtype=np.uint8)
    # image_processing_umm.py: transformers' rescale(1 / 255) (float64 product, then float32), channels first
    return torch.from_numpy((a.astype(np.float64) * (1 / 255)).astype(np.float32).transpose(2, 0, 1).copy())


def letterbox(image, size) -> torch.Tensor:
    """The released understanding preprocessing (image_processing_umm.py ``_preprocess_und``): scale so the image fits
    (H, W) = `size` (an int: square), bicubic, centred on black; -> float32 (3, H, W) in [0, 1]."""
    from ..utils import optional_import

    Image, ImageOps = optional_import("PIL", "Image", "ImageOps")

    H, W = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    im = _pil(image)
    w, h = im.size
    scale = min(H / h, W / w)
    nh, nw = int(round(h * scale)), int(round(w * scale))
    im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (W - nw) // 2, (H - nh) // 2
    im = ImageOps.expand(im, border=(left, top, W - nw - left, H - nh - top), fill=(0, 0, 0))
    return _to_tensor(im)


def square_resize(image, size) -> torch.Tensor:
    """This project's preprocessing: resize to (H, W) = `size` ignoring the aspect ratio (bicubic) -> float32
    (3, H, W) in [0, 1]."""
    from ..utils import optional_import

    Image = optional_import("PIL", "Image")

    H, W = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return _to_tensor(_pil(image).resize((W, H), Image.Resampling.BICUBIC))


def to_profile_range(x01: torch.Tensor, profile: Profile) -> torch.Tensor:
    """Pixels in [0, 1] -> the profile's range."""
    return x01 if tuple(profile.pixel_range) == (0.0, 1.0) else x01 * 2 - 1


def preprocess(image, size, profile: Profile) -> torch.Tensor:
    """A PIL image / uint8 array to understand -> (3, H, W) in the profile's pixel range, by its preprocessing."""
    x = letterbox(image, size) if profile.preprocess == "letterbox" else square_resize(image, size)
    return to_profile_range(x, profile)


def dummy_image(seed, size, profile: Profile) -> torch.Tensor:
    """The dummy image of a prompt without one: the released processor's draw (``np.random.randint(0, 256,
    (256, 256, 3), uint8)`` from ``np.random.RandomState(seed)``: what ``np.random.seed(seed)`` then the released
    processor gives; `seed` may be a RandomState to draw from), letterboxed to `size` -> (3, H, W) in the
    profile's pixel range."""
    import numpy as np

    s = profile.dummy_source_size
    rs = seed if isinstance(seed, np.random.RandomState) else np.random.RandomState(int(seed) % (2 ** 32))
    a = rs.randint(0, 256, (s, s, 3), dtype=np.uint8)
    return to_profile_range(letterbox(a, size), profile)


def replace(profile: Profile, **changes) -> Profile:
    """``dataclasses.replace`` for a profile (one convention switched)."""
    return dataclasses.replace(profile, **changes)
