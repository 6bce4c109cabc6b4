"""presence-notify: an events plugin in Python (componentize-py), against
plugin-sdk/wit alone. When a client comes online (its first device) or goes
offline (its last device), the members of a roster channel are told:
`{"presence":"online","client_id":7}`.

Settings (presence-notify.toml, [settings]): `channel` (default "presence").
"""

import json

from wit_world import exports
from wit_world.exports import events as hook
from wit_world.imports import host


class Events(exports.Events):
    def on_presence(self, event: hook.PresenceEvent) -> None:
        first_online = event.kind == hook.Presence.ONLINE and event.devices == 1
        last_offline = event.kind == hook.Presence.OFFLINE and event.devices == 0
        if not (first_online or last_offline):
            return
        channel = json.loads(host.config() or "{}").get("channel", "presence")
        kind = "online" if first_online else "offline"
        notice = json.dumps({"presence": kind, "client_id": event.client_id}, separators=(",", ":"))
        host.send_channel(0, channel, notice)
