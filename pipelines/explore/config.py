"""What ``curate explore`` shows: every cap that bounds a page's size and the site's build time."""

from __future__ import annotations

from dataclasses import dataclass

from catalog.config import at_least
from pipelines.stages.thumbnails import ThumbnailsConfig


@dataclass(frozen=True)
class ExploreConfig:
    """Caps per page; the images shown (and so the thumbnails built) are at most these times the nodes.

    ``deepest_level`` is the lowest level that gets its own pages: at billions of images, level 1 holds
    tens of millions of clusters and ``deepest_level=3`` keeps the site (and its build) small.
    """

    thumb_size: int = 64  # pixels, square cells
    sheet_cols: int = 10  # a sprite sheet is sheet_cols × sheet_cols thumbnails
    jpeg_quality: int = 80
    central: int = 8  # strip: members closest to the node's centroid …
    random: int = 4  # … plus this many random members
    members: int = 24  # cluster page: pool members, half curated and half not
    child_thumbs: int = 4  # thumbnails beside each child in a node's children list …
    children_with_thumbs: int = 24  # … for its largest children
    max_children: int = 1000  # children listed per node (largest first; the rest counted)
    neighbours: int = 6  # nearest clusters at the same level
    node_duplicates: int = 8  # removed duplicates shown per node
    dup_groups: int = 1000  # duplicate groups listed (largest first)
    dup_groups_per_page: int = 50
    dup_per_group: int = 12  # removed images shown per group
    retrieval_seed_images: int = 40  # seed images shown per seed
    retrieved_per_seed_image: int = 8
    error_examples: int = 20  # per reason
    max_runs: int = 1000  # most recent manifests on the runs page
    search_rows_per_shard: int = 4000
    deepest_level: int = 1
    seed: int = 0  # picks the "random" members

    def __post_init__(self) -> None:
        at_least(self, 1, "dup_groups_per_page", "search_rows_per_shard", "deepest_level")
        self.thumbnails()  # checks the thumbnail keys now, not after the pages are planned

    def thumbnails(self) -> ThumbnailsConfig:
        """The settings of the ``thumbnails`` stage that draws this site's sprite sheets."""
        return ThumbnailsConfig(self.thumb_size, self.sheet_cols, self.jpeg_quality)
