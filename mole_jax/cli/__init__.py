"""The command line: one function per `launch.py` subcommand, taking the parsed flags and calling
the layers below; the flag definitions and per-command help. The top floor: imports anything,
imported by nothing but `launch.py`.
"""
