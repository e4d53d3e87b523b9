"""Fuzz targets for every parser that reads bytes from across a trust boundary (docs/fuzzing.md).

``targets`` holds one ``target_x(data: bytes) -> None`` per parser and the registry ``TARGETS``;
``seeds`` the valid inputs they start from; ``mutate`` the mutator; ``runner`` the loop behind
``python -m tests.fuzz``; ``test_properties`` one hypothesis property per target.
"""
