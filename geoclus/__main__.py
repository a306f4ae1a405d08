"""``python -m geoclus`` runs the CLI."""

from geoclus.cli import main

main()
