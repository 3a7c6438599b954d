"""Process-level setup shared by entry points: logging, error reporting, exit codes.

The contract of every entry point (``run_main``): a user error is ONE line
``error: ...`` on stderr and it is the last line there; the details (full traceback,
INFO logs of every library) go to the run's log file (``log_to_file``, e.g.
``WORKDIR/train.log``, appended per attempt). After the error line, stderr is pointed
at that log file (or /dev/null), so nothing printed while the process shuts down
(Orbax's async save threads, asyncio, grain workers) can follow it.
"""

from __future__ import annotations

import contextlib
import datetime
import logging as py_logging
import os
import re
import shlex
import socket
import sys
import threading
import traceback
from typing import Callable, Iterator, Sequence

class UserError(Exception):
  """An error the user can fix; entry points print its one-line message and exit 1."""


class FlagError(UserError):
  """A command-line flag or config file that cannot be parsed."""


EXIT_OK = 0
EXIT_ERROR = 1
# After a clean save on SIGTERM/SIGINT (preemption). 75 is EX_TEMPFAIL in sysexits.h:
# "temporary failure, retry"; the cluster launchers requeue on it.
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130  # A second Ctrl-C: 128 + SIGINT, as shells report it.

# Called (in order) when an entry point exits on an error, after the error line: e.g.
# research.checkpoint waits for and closes open checkpoint managers, so their async
# threads do not die noisily at interpreter shutdown.
_error_exit_hooks: list[Callable[[], None]] = []
_log_file: dict[str, object] = {}  # 'path', 'handler', 'stream'


def on_error_exit(hook: Callable[[], None]) -> None:
  if hook not in _error_exit_hooks:
    _error_exit_hooks.append(hook)


class _DropLibraryInfo(py_logging.Filter):
  """Orbax and grain log every save step at INFO; keep their warnings only."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    noisy = any(s in record.pathname for s in ('/orbax/', '/grain/', '/jax/_src/'))
    return record.levelno >= py_logging.WARNING or not noisy


class _DropKnownNoise(py_logging.Filter):
  """Messages that are never actionable for our users, dropped everywhere.

  Orbax warns "Metadata file does not exist" for every step of a checkpoint directory
  written without its optional per-step metadata (our steps, and ones a crash left
  half-written, which Orbax then cleans up itself)."""

  PATTERNS = ('Metadata file does not exist',)

  def filter(self, record: py_logging.LogRecord) -> bool:
    try:
      message = record.getMessage()
    except Exception:  # A malformed record is not ours to judge.
      return True
    return not any(p in message for p in self.PATTERNS)


class _NoLibraryTracebacks(py_logging.Filter):
  """A library logging an exception with its traceback (Orbax's async save thread on a
  full disk) stays off stderr: the entry point reports that error in one line, and the
  log file keeps the traceback."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    library = any(s in record.pathname for s in ('/orbax/', '/grain/', '/jax/', '/asyncio/',
                                                 '/concurrent/'))
    return not (library and record.exc_info)


def setup() -> None:
  """Quiet third-party noise before jax is imported."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  from research.compile_cache import enable_compilation_cache
  enable_compilation_cache()  # Reruns load the compiled step (time to first step).
  from absl import logging as absl_logging

  handler = absl_logging.get_absl_handler()
  handler.addFilter(_DropLibraryInfo())
  handler.addFilter(_DropKnownNoise())
  handler.addFilter(_NoLibraryTracebacks())
  # Orbax logs through absl and through its own python loggers; filter at the source
  # too, so the log file is spared the same noise.
  absl_logging.get_absl_logger().addFilter(_DropKnownNoise())


def one_line(message: object) -> str:
  return ' '.join(str(message).split())


def command_line() -> str:
  """This process's command as typed: ``python -m launch.train --config=...``."""
  main = sys.modules.get('__main__')
  spec = getattr(main, '__spec__', None)
  head = ['python', '-m', spec.name] if spec is not None and spec.name else \
      ['python'] + sys.argv[:1]
  return shlex.join(head + sys.argv[1:])


# --------------------------------------------------------------------------- log file


def log_to_file(workdir: str, name: str = 'train.log') -> str | None:
  """Appends every log record (INFO and up, all libraries) to ``workdir/name``.

  Writes a header line per attempt (time, host, pid, command) so the attempts of a
  resumed run can be told apart. Returns the path, or None when the workdir cannot be
  written (validation reports that with a proper message later).
  """
  close_log_file()
  path = os.path.join(workdir, name)
  try:
    os.makedirs(workdir, exist_ok=True)
    stream = open(path, 'a', buffering=1, encoding='utf-8', errors='backslashreplace')
  except OSError:
    return None
  now = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')
  stream.write(f'===== attempt started {now} on {socket.gethostname()} pid {os.getpid()}: '
               f'{command_line()}\n')
  handler = py_logging.StreamHandler(stream)
  handler.setLevel(py_logging.INFO)
  handler.setFormatter(py_logging.Formatter(
      '%(levelname).1s %(asctime)s %(filename)s:%(lineno)d] %(message)s'))
  handler.addFilter(_DropKnownNoise())
  root = py_logging.getLogger()
  root.addHandler(handler)
  if root.level > py_logging.INFO or root.level == py_logging.NOTSET:
    root.setLevel(py_logging.INFO)
  _log_file.update(path=path, handler=handler, stream=stream)
  sys.unraisablehook = _unraisable_to_log
  threading.excepthook = _thread_exception_to_log
  return path


def log_file_path() -> str | None:
  return _log_file.get('path')  # type: ignore[return-value]


def close_log_file() -> None:
  if not _log_file:
    return
  py_logging.getLogger().removeHandler(_log_file['handler'])  # type: ignore[arg-type]
  try:
    _log_file['stream'].close()  # type: ignore[union-attr]
  except OSError:
    pass
  _log_file.clear()


def _to_log(text: str) -> None:
  stream = _log_file.get('stream')
  if stream is None:
    return
  try:
    stream.write(text if text.endswith('\n') else text + '\n')  # type: ignore[union-attr]
    stream.flush()  # type: ignore[union-attr]
  except (OSError, ValueError):
    pass


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
  """Sends file descriptor 2 to the log file (or /dev/null) inside the block.

  For library calls that print tracebacks straight to stderr from their own threads
  or at garbage collection (a failed Orbax/TensorStore restore leaves coroutines that
  print "Event loop is closed" and "Exception ignored in" later); the block should end
  with ``gc.collect()`` where such leftovers may remain. Log our own messages after it.
  """
  sys.stderr.flush()
  saved = os.dup(2)
  try:
    path = _log_file.get('path')
    target = os.open(path, os.O_WRONLY | os.O_APPEND) if path else os.open(os.devnull, os.O_WRONLY)
    os.dup2(target, 2)
    os.close(target)
  except OSError:
    os.close(saved)
    yield
    return
  try:
    yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)


def _unraisable_to_log(unraisable) -> None:
  """'Exception ignored in ...' reports (never actionable for a user) go to the log."""
  if not _log_file:
    return _default_unraisablehook(unraisable)
  trace = ''.join(traceback.format_exception(
      unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback))
  _to_log(f'Exception ignored in {unraisable.object!r}: {trace}')


_default_unraisablehook = sys.unraisablehook


def _thread_exception_to_log(args) -> None:
  """An exception that ends a library thread (an async save) goes to the log file; the
  main thread reports its consequence in one line."""
  if not _log_file:
    return _default_threading_excepthook(args)
  trace = ''.join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
  _to_log(f'Exception in thread {getattr(args.thread, "name", "?")}: {trace}')


_default_threading_excepthook = threading.excepthook


# --------------------------------------------------------------------------- exiting


def _finish(code: int, last_line: str | None) -> None:
  """Prints the last line, then sends anything later on stderr to the log file."""
  if last_line is not None:
    _to_log(last_line)
    sys.stdout.flush()
    print(last_line, file=sys.stderr, flush=True)
  stream = _log_file.get('stream')
  try:
    target = os.open(_log_file['path'], os.O_WRONLY | os.O_APPEND) if stream else \
        os.open(os.devnull, os.O_WRONLY)
    os.dup2(target, 2)
    os.close(target)
  except OSError:
    pass
  for hook in _error_exit_hooks:
    try:
      hook()
    except BaseException:  # pylint: disable=broad-except
      _to_log('while shutting down after the error:\n' + traceback.format_exc())
  sys.exit(code)


def report_exception(e: BaseException) -> tuple[int, str]:
  """(exit code, the one last line) for an exception that ends an entry point; the
  traceback goes to the log file (or stderr when there is none)."""
  from research.preemption import Preempted
  trace = ''.join(traceback.format_exception(e))
  _to_log(trace)
  if isinstance(e, Preempted):
    return EXIT_PREEMPTED, one_line(e)
  if isinstance(e, UserError):
    return EXIT_ERROR, f'error: {one_line(e)}'
  if isinstance(e, KeyboardInterrupt):
    return EXIT_INTERRUPTED, 'error: interrupted (second Ctrl-C); rerun to resume from the last checkpoint.'
  where = log_file_path()
  if where is None:  # No log file: the traceback is the only record, keep it.
    sys.stderr.write(trace)
    where_text = 'traceback above'
  else:
    where_text = f'traceback in {where}'
  first = one_line(e)[:300] or '(no message)'
  return EXIT_ERROR, (f'error: internal error {type(e).__name__}: {first} ({where_text}; '
                      f'please report it).')


def run_main(main: Callable, flags_parser: Callable | None = None) -> int:
  """Runs an absl main; errors end in one line on stderr and a non-zero exit code."""
  from absl import app

  def wrapped(argv):
    try:
      main(argv)
    except (Exception, KeyboardInterrupt) as e:  # pylint: disable=broad-except
      code, line = report_exception(e)
      _finish(code, line)

  try:
    app.run(wrapped, flags_parser=flags_parser or _parse_flags)
  except SystemExit as e:
    return int(e.code or 0) if not isinstance(e.code, str) else EXIT_ERROR
  return EXIT_OK


# --------------------------------------------------------------------------- flags


def _root_cause(e: BaseException) -> BaseException:
  """The first UserError along the cause/context chain, else the innermost exception.

  absl re-raises a flag parser's error as IllegalFlagValueError and ml_collections
  re-raises a config file's error with the traceback pasted into the message; the
  original is further down the chain."""
  seen, chain = set(), []
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    chain.append(e)
    e = e.__cause__ or e.__context__
  for x in reversed(chain):  # Innermost first: ml_collections re-raises type(e)(...).
    if isinstance(x, UserError):
      return x
  return chain[-1]


def _config_flag_names(flag_values) -> list[str]:
  from ml_collections.config_flags import config_flags
  return [name for name in flag_values if config_flags.is_config_flag(flag_values[name])]


def _flag_arg(argv: Sequence[str], name: str) -> str:
  for a in argv:
    if a.startswith(f'--{name}='):
      return a
  return f'--{name}'


def _explain_config_error(flag: str, e: BaseException) -> str:
  """One line for a config file that could not be loaded or run."""
  cause = _root_cause(e)
  if isinstance(cause, UserError):
    text = one_line(cause)
    return text if text.startswith(flag) else f'{flag}: {text}'
  if isinstance(cause, SyntaxError):
    where = f'{cause.filename}, line {cause.lineno}' if cause.filename else 'the config file'
    return f'{flag}: syntax error in {where}: {cause.msg}; fix the config file.'
  if isinstance(cause, OSError) and ('Failed loading config file' in str(cause) or
                                     cause.errno is not None):
    path = flag.split('=', 1)[-1].split(':', 1)[0]
    if not os.path.exists(path):
      return (f'{flag}: no such config file {path!r} (relative paths are taken from '
              f'{os.getcwd()}); check the path, e.g. experiments/pretrain/tiny.py.')
    return f'{flag}: cannot read config file {path!r} ({cause.strerror or one_line(cause)}).'
  text = one_line(cause)
  if 'Traceback (most recent call last)' in text:  # ml_collections' pasted traceback.
    text = text.rsplit('^', 1)[-1].strip() or text[-300:]
  return f'{flag}: {type(cause).__name__}: {text[:300]}'


def _unknown_override(argv: Sequence[str], e: BaseException) -> str:
  # ml_collections raises KeyError/AttributeError for an unknown --config.KEY.
  text = str(e)
  key = re.search(r"([A-Za-z_][A-Za-z0-9_]*)", text)
  key = key.group(1) if key else '?'
  hint = re.search(r'Did you mean "([^"]+)"', text)
  hint = f' did you mean {hint.group(1)!r}?' if hint else ''
  bad = [a.split('=')[0] for a in argv if a.startswith('--config.') and key in a]
  where = bad[0] if bad else 'a --config.* override'
  return (f'{where}: unknown config key {key!r};{hint} the keys are declared in '
          f'research/config.py.')


def parse_flags(argv: Sequence[str], flag_values=None) -> list[str]:
  """absl flag parsing whose every failure is a one-line FlagError.

  Covers: unknown flags and bad flag values, a config file that is missing, has a
  syntax error or raises in ``get_config`` (e.g. an unknown ``:arg`` key), and
  ``--config.KEY=VALUE`` overrides of unknown keys or of the wrong type.
  """
  from absl import flags
  fv = flag_values if flag_values is not None else flags.FLAGS
  try:
    rest = fv(list(argv))
  except (KeyError, AttributeError) as e:
    raise FlagError(_unknown_override(argv, e)) from None
  except flags.Error as e:
    cause = _root_cause(e)
    name = getattr(e, 'flag_name', None) or ''
    message = one_line(e)
    if cause is not e and (isinstance(cause, (UserError, SyntaxError, OSError)) or
                           'Error whilst parsing config file' in message):
      flag = next((f for f in _config_flag_names(fv) if f'--{f}=' in message), 'config')
      raise FlagError(_explain_config_error(_flag_arg(argv, flag), cause)) from None
    unknown = re.match(r"Unknown command line flag '([^']+)'", message)
    if unknown and any(unknown.group(1).startswith(f + '.') for f in _config_flag_names(fv)):
      key = unknown.group(1).split('.', 1)[1]
      raise FlagError(f'--{unknown.group(1)}: unknown config key {key!r}; the keys are '
                      'declared in research/config.py.') from None
    if 'Traceback (most recent call last)' in message:
      message = message.split('Traceback (most recent call last)')[0].rstrip(': ')
    raise FlagError(message or name) from None
  except (SyntaxError, OSError, ValueError, TypeError, NameError, ImportError) as e:
    # Raised while importing a config file (absl only wraps TypeError/ValueError).
    flag = next((f for f in _config_flag_names(fv) if any(
        a.startswith(f'--{f}=') for a in argv)), 'config')
    raise FlagError(_explain_config_error(_flag_arg(argv, flag), e)) from None
  # A config file that failed to open is only reported when first accessed; check now.
  for name in _config_flag_names(fv):
    value = fv[name].value
    if type(value).__name__ == '_ErrorConfig':
      error = object.__getattribute__(value, '_error')
      raise FlagError(_explain_config_error(_flag_arg(argv, name), error))
  return rest


def _parse_flags(argv):
  """The absl ``flags_parser`` of ``run_main``: parse errors print one line, exit 1."""
  try:
    return parse_flags(argv)
  except UserError as e:
    print(f'error: {one_line(e)}', file=sys.stderr, flush=True)
  sys.exit(EXIT_ERROR)
