"""``python -m fleet_server``: the ``fleet-server`` command."""

from fleet_server.cli import main

raise SystemExit(main())
