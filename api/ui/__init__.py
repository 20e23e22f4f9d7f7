"""The status page: `/ui`, served by the GSLB API itself (viewer role).

No build step and nothing fetched at run time: one HTML page, a stylesheet and a little
JavaScript shipped in the package (`static/`), fed by a JSON model of the fleet that
`fleet.fleet_model` derives purely from the API's snapshot, and kept live by server-sent
events (`/ui/stream`) on the API's own change notifications.
"""

from api.ui.routes import router

__all__ = ["router"]
