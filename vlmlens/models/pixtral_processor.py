"""Mistral 3 / Pixtral's processor without torchvision.

transformers' ``PixtralProcessor`` cannot be imported without torchvision (its module imports the fast image
processor's), although it only needs the image processor's output sizes. This processor is built on
``ProcessorMixin`` like it and with the same inputs and outputs: the PIL image processor
(``PixtralImageProcessorPil``) resizes each image to a multiple of ``patch_size * spatial_merge_size`` pixels, and
every ``[IMG]`` in the text becomes the image's token layout -- per row of tokens, ``cols`` image tokens and one
``[IMG_BREAK]``, the last row's break replaced by ``[IMG_END]``. Only ``[IMG]`` is replaced by image features; the
break and end tokens are text tokens of the vocabulary.

``load_model`` uses it when AutoProcessor cannot build transformers' (a checkpoint naming PixtralProcessor);
``from_pretrained`` reads the checkpoint's own processor, image-processor and tokenizer files.
"""

from __future__ import annotations

from transformers.processing_utils import ProcessorMixin


class PixtralProcessorPil(ProcessorMixin):
    """``[IMG]`` → Pixtral's rows of image tokens, each ended by ``[IMG_BREAK]`` (the last by ``[IMG_END]``)."""

    def __init__(self, image_processor=None, tokenizer=None, patch_size: int = 16, spatial_merge_size: int = 1,
                 chat_template=None, image_token: str = "[IMG]", image_break_token: str = "[IMG_BREAK]",
                 image_end_token: str = "[IMG_END]", **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.patch_size, self.spatial_merge_size = int(patch_size), int(spatial_merge_size)
        self.image_token, self.image_break_token, self.image_end_token = image_token, image_break_token, image_end_token
        ids = tokenizer.convert_tokens_to_ids([image_token, image_break_token, image_end_token])
        self.image_token_id, self.image_break_token_id, self.image_end_token_id = (int(i) for i in ids)
        self.image_token_ids = list(ids)

    @property
    def token_side(self) -> int:
        """Pixels per image token along each side (a patch, times the merger's side)."""
        return self.patch_size * self.spatial_merge_size

    def _process_images(self, images, **images_kwargs):
        images_kwargs["patch_size"] = self.token_side       # resized to whole tokens
        return super()._process_images(images, **images_kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        height, width = (int(x) for x in image_inputs["image_sizes"][image_idx])
        rows, cols = height // self.token_side, width // self.token_side
        layout = ((self.image_token * cols + self.image_break_token) * rows)
        return layout[: -len(self.image_break_token)] + self.image_end_token

    @property
    def model_input_names(self):
        return [*self.tokenizer.model_input_names, *self.image_processor.model_input_names, "image_sizes"]

