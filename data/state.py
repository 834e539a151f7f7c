"""The data state: what TrainBatches saves, how processes' states merge, what restores.

Per packing stream (data/dealing.py), where its next window starts: a document number
and a token offset into that document (a stream that has not started yet: the document
from which on it takes what is dealt to it). And the reader's state (per source a
position and counters, and the mixture's counter) at a document no later than any the
streams still need, with the characters dealt to each stream before that document.
Restoring reads and deals on from there and skips what the streams had already taken,
so batches continue bit for bit. A process's state holds its own streams; `merge` joins
every process's into one global state, which any process count restores.

A state with another number of streams (data.streams or the global batch size changed)
restores too, with fresh streams from the first document no stream had started.

Keys: 'version', 'layout', 'num_streams', 'batches' (global batches handed out),
'streams' ({stream index as a string: {'next', 'offset'[, 'key']}}), 'reader' (the
reader state to read on from), 'dealt' (the characters dealt to each stream before it,
less their minimum), and for checks and readers 'shard_names', 'seed', 'process_index',
'process_count'.
"""

import copy
import logging
from collections.abc import Sequence
from typing import Any

from data import dealing, sources
from data import reader as reader_lib

VERSION = 4  # Documents dealt by characters.
log = logging.getLogger(__name__)
# The layout of states from versions that split a hub source per host, each host
# numbering its own documents (and keying its own rows).
_PER_PROCESS = 'per_process'


def fresh(layout: dealing.Layout, reader_state: dict[str, Any], batches: int) -> dict[str, Any]:
  """A state whose streams start empty at the reader's document, nothing dealt yet."""
  start = int(reader_state['counter'])
  return {
      'version': VERSION,
      'layout': dealing.GLOBAL,
      'num_streams': layout.num_streams,
      'batches': batches,
      'streams': {str(j): {'next': start, 'offset': 0} for j in layout.owned()},
      'reader': reader_state,
      'dealt': [0] * layout.num_streams,
  }


def snapshot(layout: dealing.Layout, streams: dict[int, dealing.Stream],
             dealer: dealing.Dealer, batches: int) -> dict[str, Any]:
  """The state after `batches` batches, taken from this process's streams."""
  held = [s.first for s in streams.values() if s.first is not None]
  reader_state, dealt = dealer.checkpoint(held)
  saved = {}
  for j, s in streams.items():
    saved[str(j)] = s.state_dict()
    if s.first is None:  # Not started: nothing dealt to it before the reader state.
      saved[str(j)]['next'] = max(s.next, int(reader_state['counter']))
  return dict(fresh(layout, reader_state, batches), streams=saved, dealt=dealt)


def with_checks(state: dict[str, Any], reader: reader_lib.MixtureReader, *, seed: int,
                process_index: int, process_count: int) -> dict[str, Any]:
  """A copy of `state` with what restoring checks: shard names, seed, process."""
  state = copy.deepcopy(state)
  readers = zip(reader.readers, state['reader']['sources'])
  state.update(
      shard_names=[r.shard_name(sources.Position.from_dict(s['position'])) for r, s in readers],
      seed=seed,
      process_index=process_index,
      process_count=process_count,
  )
  return state


def merge(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """One state from every process's state, in any order: what to store.

  It holds every packing stream and the earliest reader state among them with the
  characters dealt before it, so any number of processes restores it (each keeps its
  own streams).
  """
  states = [copy.deepcopy(dict(s)) for s in states]
  if not states:
    raise ValueError('merge_states needs the state of every process; got none')
  if len(states) == 1:
    return states[0]
  _check_mergeable(states)
  states.sort(key=lambda s: int(s['process_index']))
  n = len(states)
  streams: dict[str, Any] = {}
  for s in states:
    for j, stream in s['streams'].items():
      if j in streams:
        raise ValueError(f'data states of two processes both hold packing stream {j}')
      streams[j] = stream
  if len(streams) != int(states[0]['num_streams']):
    raise ValueError(f'data states hold {len(streams)} of {states[0]["num_streams"]} packing '
                     'streams; merge the state of every process')
  # The reader state to read on from, with the characters dealt before it (its 'dealt').
  earliest = min(states, key=lambda s: int(s['reader']['counter']))
  merged = dict(earliest, process_count=n,
                streams=dict(sorted(streams.items(), key=lambda item: int(item[0]))))
  del merged['process_index']
  return merged


def _check_mergeable(states: list[dict[str, Any]]) -> None:
  for s in states:
    if s.get('version') != VERSION:
      raise ValueError(f'merge_states takes version-{VERSION} data states; got '
                       f'version {s.get("version")!r}')
  n = len(states)
  indices = sorted(int(s['process_index']) for s in states)
  if indices != list(range(n)) or {int(s['process_count']) for s in states} != {n}:
    raise ValueError(
        f'merge_states needs the state of each of the processes once; got process '
        f'indices {indices} of process counts '
        f'{sorted({s["process_count"] for s in states})}')
  for key in ('layout', 'num_streams', 'batches', 'seed'):
    if len({s.get(key) for s in states}) != 1:
      raise ValueError(f'data states of different processes disagree on {key!r}: '
                       f'{[s.get(key) for s in states]}')


def checked(state: dict[str, Any], reader: reader_lib.MixtureReader) -> dict[str, Any]:
  """A merged or single state, checked against the run's data.

  Raises ValueError for a state this code did not write, another numbering of the
  documents, or other sources or shards.
  """
  version = state.get('version')
  if state.get('layout') == _PER_PROCESS:
    raise ValueError(
        'data state was saved by processes that each read and numbered their own rows of '
        'a hub source (an earlier version), so its positions and held-out rows are not '
        'those of one sequence; it cannot resume here: start the run again, or resume '
        'with the code that saved it')
  if version != VERSION:
    raise ValueError(f'data state version {version!r} is not one this code reads '
                     f'({VERSION}); was it written by another version?')
  if state.get('layout') != dealing.GLOBAL:
    raise ValueError(f'data state has layout {state.get("layout")!r}, not '
                     f'{dealing.GLOBAL!r}; was it written by another version?')
  reader_state = state['reader']
  if len(reader_state['sources']) != len(reader.readers):
    raise ValueError(
        f'data state has {len(reader_state["sources"])} sources but the config names '
        f'{len(reader.readers)}; did data.mixture change?')
  names = state.get('shard_names') or [None] * len(reader_state['sources'])
  for r, s, name in zip(reader.readers, reader_state['sources'], names):
    expected = r.shard_name(sources.Position.from_dict(s['position']))
    if name is not None and name != expected:
      raise ValueError(
          f'data state points into {name!r} but the data now has {expected!r} there; '
          'did data.files or the data change?')
  return state


def same_streams(state: dict[str, Any], layout: dealing.Layout) -> bool:
  """Whether the state's streams are this run's (else `restreamed` starts fresh ones)."""
  return int(state['num_streams']) == layout.num_streams


def continued(state: dict[str, Any], layout: dealing.Layout,
              process_index: int) -> dict[str, Any]:
  """The state to build this process's streams from, for the same streams as saved."""
  saved, counter = state['streams'], int(state['reader']['counter'])
  owned = layout.owned()
  missing = [j for j in owned if str(j) not in saved]
  if missing:
    raise ValueError(
        f'data state lacks {len(missing)} packing streams of process '
        f'{process_index} (first: {missing[0]}); restore from '
        "TrainBatches.merge_states of every process's state_dict()")
  new = fresh(layout, state['reader'], int(state['batches']))
  new['streams'] = {str(j): dict(saved[str(j)]) for j in owned}
  new['dealt'] = [int(x) for x in state['dealt']]
  if len(new['dealt']) != layout.num_streams:
    raise ValueError(f'data state deals documents to {len(new["dealt"])} streams, not '
                     f'{layout.num_streams}')
  # Reading on from a later document would skip one a stream of this process needs.
  late = min(owned, key=lambda j: int(saved[str(j)]['next']))
  if int(saved[str(late)]['next']) < counter:
    raise ValueError(
        f'data state reads on from document {counter}, after document '
        f'{saved[str(late)]["next"]} that stream {late} still needs; restore from '
        "TrainBatches.merge_states of every process's state_dict()")
  return new


def restreamed(state: dict[str, Any], layout: dealing.Layout,
               reader: reader_lib.MixtureReader) -> dict[str, Any]:
  """A state of fresh streams for another stream count; moves `reader` to read there.

  Another data.streams or global batch size: rather than failing the resume, fresh
  streams start at the first document no stream had started. What the streams were
  packing is not finished, and documents read for a stream that had not reached them
  are skipped.
  """
  if len(state['streams']) != int(state['num_streams']):
    raise ValueError(
        f'data state holds {len(state["streams"])} of its {state["num_streams"]} packing '
        "streams; restore from TrainBatches.merge_states of every process's state_dict()")
  reader_state = state['reader']
  start = max([int(s['next']) + (int(s['offset']) > 0) for s in state['streams'].values()]
              + [int(reader_state['counter'])])
  log.warning('data state has %s packing streams, resuming with %d from document %d',
              state['num_streams'], layout.num_streams, start)
  reader.load_state_dict(reader_state)
  while reader.counter < start:
    reader.next()
  return fresh(layout, reader.state_dict(), int(state['batches']))
