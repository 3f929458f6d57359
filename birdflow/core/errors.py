"""What birdflow raises on purpose, drawn as a tree: the class of an error says what happens next.

    BirdflowError
    ├── Unprocessable        the audio or a run's parameters: the recording is set aside in failed/, never retried
    │   ├── AudioError           not decodable audio (core/audio.py)
    │   ├── WavError             a WAV header birdflow does not take (core/wav.py)
    │   ├── RecordingNameError   a file name that is no recording's (core/recordings.py)
    │   ├── MissingAudio         neither the file nor its archived copy (flows/process_recording.py)
    │   └── SourceRefused        a run pointed outside the folders runs may read (flows/process_recording.py)
    ├── Refused              a request not done as asked: an HTTP 4xx, a command's message; nothing else changes
    │   ├── Rejection (ingest_api/checks.py: its status), FramingError, StreamRejected, TooManyRecordings
    │   ├── HealthRefused (core/health.py)    ExportError (core/exports.py)    ReviewError (core/reviews.py)
    │   └── SqlError (core/sql.py)    ChannelError (app/notify.py)    NotOurFlow (flows/worker.py)
    ├── SettingsError        a setting is invalid: a process stops at start, a run is retried once it is fixed
    ├── StateFileError       a state file (the hourly Parquet, the link key, a SQLite file of a newer schema) cannot be
    │                        read: retried and reported
    │   ├── LinkKeyError (core/links.py)
    │   └── StateFileDamaged     a damaged SQLite state file, moved aside and rebuilt (core/local_db.py)
    └── retried as any other failure, named for the log:
        ArchiveError (core/archive.py)    InsufficientStorage (core/disk.py: the ingest API's 507)
        ExecutorFailed (flows/executor.py: the executor stops)    AlreadyRunning (app/single.py)
        FlacError (core/flac.py: a FLAC copy that fails its check; the WAV is archived instead)
        ConversionError (core/birdnet_runtimes.py: a model the converter does not know; `auto` keeps LiteRT)
    Anything else (the disk, the network, an archive, a sink, a library's own error): retried.

Third-party errors are mapped where they enter (the decoders, the Parquet reader, the parameters' validation), so
a library's `ValueError` never decides the fate of a recording. The families also subclass ValueError, as before:
every caller that took a bad value as a `ValueError` still does; only `Unprocessable` gives audio up.
"""

from __future__ import annotations

__all__ = ["BirdflowError", "Refused", "SettingsError", "StateFileDamaged", "StateFileError", "Unprocessable"]


class BirdflowError(Exception):
    """Raised by birdflow on purpose (its subclass says what follows)."""


class Unprocessable(BirdflowError, ValueError):
    """The audio or the run's parameters: the same input fails the same way, so the recording is given up."""


class Refused(BirdflowError, ValueError):
    """A request (an HTTP request, a command) refused as asked, with a message that says why."""


class SettingsError(BirdflowError, ValueError):
    """A setting is invalid; the message names it."""


class StateFileError(BirdflowError):
    """A state file birdflow keeps cannot be read: the message names the file, a run meeting it is retried."""


class StateFileDamaged(StateFileError):
    """A state file met a damaged page; it has been moved aside and rebuilt, so a retry finds it whole."""
