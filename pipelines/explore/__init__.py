"""``curate explore``: a static site to browse a catalog (cluster tree, duplicates, retrievals, errors, runs).

The site is plain files: ``index.html``, ``app.js`` and ``style.css`` (shipped in ``static/``), one small
data file per page under ``data/`` and thumbnail sprite sheets under ``thumbs/``. It needs no server, so
it opens from ``file://``, from ``python -m http.server`` and from a bucket's static hosting alike.

- ``config``: what the site shows and the caps that bound every page;
- ``tree``: the cluster tree's per-node data, from DuckDB group-bys and window queries;
- ``pages``: the other pages (duplicates, retrieval, errors, runs, search index, summary);
- ``writer``: data files and static assets written into the site folder;
- ``site``: the build, in order; the sprite sheets are the ``thumbnails`` stage
  (`pipelines.stages.thumbnails`), run by the one runner on the site folder.
"""
