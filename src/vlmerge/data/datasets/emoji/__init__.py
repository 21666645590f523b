"""Emoji pictures captioned with their CLDR names: a small, real image-text dataset from three Debian packages
(`fonts-noto-color-emoji`, `unicode-cldr-core`, `unicode-data`).

- `records`: which emoji there are, their names, keywords, groups and splits;
- `render`: each emoji drawn as one picture;
- `dataset`: the rendered set with its records, cached on disk;
- `tasks`: VQA- and NLVR2-style examples generated from the records;
- `source`: all of it as the `emoji` data source.
"""
