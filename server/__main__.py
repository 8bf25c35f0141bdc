"""`python -m server serve ...`: the serving commands alone (faster to start than `flowserve`)."""

from server.cli import main

main()
