"""netra's load benchmark (`python -m bench`); see README.md beside this file."""
