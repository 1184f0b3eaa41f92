-- One long-lived pandoc process that converts many texts, run as `pandoc lua pandoc_worker.lua`.
--
-- A request on stdin is a line "<reader> <writer> <size>" followed by <size>
-- bytes of UTF-8 input. The reply on stdout is a line "ok <size>" or
-- "error <size>" followed by <size> bytes: the converted text or the error
-- message. The loop ends when stdin closes, so the worker goes away with
-- the process that started it.
--
-- The reader runs in pandoc's sandbox with no files, as `--sandbox` does on
-- the command line, and the writer does not wrap lines, as `--wrap=none`.

local WRITER_OPTIONS = { wrap_text = "wrap-none" }
local NO_FILES = {}

local function reply(status, body)
  io.stdout:write(status, " ", #body, "\n", body)
  io.stdout:flush()
end

local function convert(text, reader, writer)
  local document = pandoc.read(text, reader, {}, NO_FILES)
  return pandoc.write(document, writer, WRITER_OPTIONS)
end

while true do
  local header = io.stdin:read("l")
  if header == nil then
    break
  end

  local reader, writer, size = header:match("^(%S+) (%S+) (%d+)$")
  if reader == nil then
    -- The stream is out of step and cannot be trusted any further.
    reply("error", "malformed request header")
    break
  end

  size = tonumber(size)
  local text = ""
  if size > 0 then
    text = io.stdin:read(size)
  end
  if text == nil or #text ~= size then
    break
  end

  local ok, result = pcall(convert, text, reader, writer)
  if ok then
    reply("ok", result)
  else
    reply("error", tostring(result))
  end
end
