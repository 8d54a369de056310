"""Versioned wire API of the sidecar (generated protobuf + gRPC stubs, see ``proto/``).

Example::

    from sidecar.api import v1
    req = v1.GetIncidentRequest(incident_id="inc-1")
"""

__all__: list[str] = []   # the versioned packages (``v1``) are imported by name
