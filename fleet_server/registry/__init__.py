"""The device registry: devices, labels, cohorts and version tracking (database queries; the API is in
:mod:`fleet_server.api.devices`, :mod:`fleet_server.api.cohorts` and :mod:`fleet_server.api.versions`)."""
