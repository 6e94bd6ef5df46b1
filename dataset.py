"""Finding, checking, caching, splitting and augmenting ISIC 2018 Task 1 data."""
