"""Corpus preparation on datatrove: read, filter, scrub personal data, deduplicate
(MinHash) and decontaminate a corpus into JSON lines that `data.source=files` trains on.

scripts/prepare_data.py is the command; docs/data_prep.md says what each stage does.
"""
