"""Code that only the tests use: reference implementations the library's fast paths are checked
against, and helpers that drive library objects the way a test needs to."""
