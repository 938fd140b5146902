"""Which images of an annotation file are read as stored, their EXIF orientation not applied, told once.

The rule is `image_decode.keeps_stored_pixels` (an orientation 5-8 that swaps a non-square image's sides,
and a json width/height equal to the stored pixels rather than the displayed ones: the boxes were drawn on
the stored pixels). Datasets apply it per image when they decode (they pass the record's height/width);
this check runs the same rule on each image's header while the reader goes through the file, so the log
says once per file how many images it concerns, with an example, instead of once per decoded image in
every DataLoader worker. Both readers (COCO, ODVG), hence every model, use it.
"""

from __future__ import annotations

import logging
from typing import List, Optional

from groundlab.data.image_decode import ImageDecodeError, reads_as_stored
from groundlab.data.image_source import ImageSource, ImageSourceError

log = logging.getLogger(__name__)

# A JPEG's header (EXIF segment at most 64 KiB, then the frame size) comes before its pixels. Most headers
# end within 16 KiB (no thumbnail), a phone photo's within 256 KiB: the check reads that much, and the whole
# file only when the header goes on past it, so it never reads whole 5 MB photos, nor most of a small one.
HEAD_BYTES = (16 * 1024, 256 * 1024)


class OrientationCheck:
    """Tally, for one annotation file, of the images `decode_rgb` will read as stored.

    Attributes: json_file, source (None: nothing is checked), names (the images found, in file order)."""

    def __init__(self, json_file: str, source: Optional[ImageSource]):
        self.json_file, self.source = json_file, source
        self.names: List[str] = []

    def check(self, name: str, height: Optional[int], width: Optional[int]) -> bool:
        """Whether image `name`, annotated at (height, width), is read as stored (and note it).

        Unreadable images answer False: the dataset reports them, by name, when it decodes them."""
        if self.source is None or height is None or width is None:
            return False
        stored = False
        try:
            for size in HEAD_BYTES + (None,):
                data = self.source.read_head(name, size) if size else self.source.read(name)
                try:
                    stored = reads_as_stored(data, (height, width), name)
                    break
                except ImageDecodeError:
                    if size is None or len(data) < size:
                        return False  # that was the whole file: not an image the check can read
        except ImageSourceError:
            return False
        if stored:
            self.names.append(name)
        return stored

    def log(self) -> None:
        """One warning line when any image is read as stored; nothing otherwise."""
        if not self.names:
            return
        n = len(self.names)
        log.warning(
            "%s: %d image%s (e.g. %r) carry an EXIF orientation that turns them on their side, but the json's "
            "width/height are their stored size: the boxes were drawn on the stored pixels, so %s read as stored "
            "(not rotated)", self.json_file, n, "" if n == 1 else "s", self.names[0], "it is" if n == 1 else "they are")
