"""REST endpoints of the command channel: send a command, read it, page them, cancel one.

Thin, as every endpoint: inputs checked against the contract, one call into the command
service, its domain errors turned into problems by `api.endpoint`.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway import contract
from gateway.commands import model
from gateway.contract import Reply
from gateway.endpoints.api import ORJSONResponse, endpoint, given
from gateway.runtime import Gateway

ON_DEVICE = ("device-not-found",)
LOCATION = {"Location": "The command's URL"}


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


def _location(device_id: str, command_id: str) -> dict[str, str]:
    return {"Location": f"/api/devices/{device_id}/commands/{command_id}"}


@endpoint(
    (
        Reply(202, contract.Command, "Accepted: sent, or queued for the device", headers=LOCATION),
        Reply(200, contract.Command, "Final within `wait`", headers=LOCATION),
    ),
    access="write",
    problems=(*ON_DEVICE, "command-queue-full", "command-exists", "device-offline"),
    tag="commands",
)
async def send_command(
    request: Request,
    device_id: contract.DeviceId,
    body: contract.CommandRequest,
    query: contract.CommandWait,
) -> Response:
    """Send a command to the device: at once when it is connected, else when it connects.

    The device has `timeout` seconds to answer each time the command is sent; a command sent
    to a session that ended unanswered is sent again on the next connect while its `ttl`
    lasts. With `wait`, the answer comes when the command is final (200), or after `wait`
    seconds with where it stands (202). Refusals store nothing.
    """
    gateway = _gateway(request)
    command = model.NewCommand(
        command_id=given(body.command_id) or model.new_command_id(),
        name=body.name,
        params=model.encode_params(body.params, gateway.store.limits),
        timeout=body.timeout,
        ttl=body.ttl,
    )
    commands = gateway.commands
    final = None
    if query.wait > 0:
        accepted, final = await commands.accept_and_wait(
            gateway.channels, device_id, command, query.wait
        )
        shown = final or await commands.get(device_id, accepted.command_id)
    else:
        accepted = await commands.accept(device_id, command)
        # one just made is shown from what its script wrote, without reading it back
        shown = (
            accepted.shown(command)
            if accepted.created
            else await commands.get(device_id, accepted.command_id)
        )
    return ORJSONResponse(
        shown.to_dict(),
        status_code=200 if final is not None else 202,
        headers=_location(device_id, command.command_id),
    )


@endpoint(
    Reply(200, contract.Command, "The command"),
    problems=(*ON_DEVICE, "command-not-found"),
    tag="commands",
)
async def get_command(
    request: Request, device_id: contract.DeviceId, command_id: contract.CommandId
) -> Response:
    """One command and where it stands.

    A final command is kept for `GATEWAY_COMMAND_RETENTION` (24 h by default), then it is
    `command-not-found`.
    """
    command = await _gateway(request).commands.get(device_id, command_id)
    return ORJSONResponse(command.to_dict())


@endpoint(Reply(200, contract.CommandPage, "A page"), problems=ON_DEVICE, tag="commands")
async def list_commands(
    request: Request, device_id: contract.DeviceId, query: contract.CommandQuery
) -> Response:
    """The device's commands, newest first."""
    commands, following = await _gateway(request).commands.page(
        device_id, query.status, query.limit, given(query.cursor) or None
    )
    return ORJSONResponse(
        {"items": [command.to_dict() for command in commands], "next_cursor": following}
    )


@endpoint(
    Reply(200, contract.Command, "Canceled"),
    access="write",
    problems=(*ON_DEVICE, "command-not-found", "command-finished"),
    tag="commands",
)
async def cancel_command(
    request: Request, device_id: contract.DeviceId, command_id: contract.CommandId
) -> Response:
    """Cancel a command that is not final yet (`command-finished` when it is).

    A device that got the command already is not told; a result it sends later changes
    nothing.
    """
    command = await _gateway(request).commands.cancel(device_id, command_id)
    return ORJSONResponse(command.to_dict())


_COMMANDS = "/api/devices/{device_id}/commands"
routes: list[BaseRoute] = [
    Route(_COMMANDS, send_command, methods=["POST"]),
    Route(_COMMANDS, list_commands, methods=["GET"]),
    Route(_COMMANDS + "/{command_id}", get_command, methods=["GET"]),
    Route(_COMMANDS + "/{command_id}", cancel_command, methods=["DELETE"]),
]
