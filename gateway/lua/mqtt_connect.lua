-- An MQTT status `online`: connect.lua (which follows this in the same script), unless the
-- session named is the device's current one already. A status repeated (a device's own
-- keep-alive, the same message handled by two processes, a retained copy redelivered) is then
-- a heartbeat and takes nothing: the process that took the session keeps sending its commands.
-- Keys and arguments as connect.lua's (KEYS[1] device:state:{id}, ARGV[2] session).
-- Returns {2} when the session was current already, else as connect.lua.
if redis.call('HGET', KEYS[1], G_SESSION) == ARGV[2] then
  return {2}
end
