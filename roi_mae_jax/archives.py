"""Unpacking an uploaded workdir archive without letting it write outside its folder.

    from roi_mae_jax import archives
    folder = archives.extract("run.zip", "checkpoint")   # .zip, or .tar[.gz|.bz2|.xz]

A member with an absolute path, a `..` step, a link or a device file is
refused (`InputError` naming the archive and the member) before anything is
written; tar archives go through Python's "data" extraction filter as well.
"""

from __future__ import annotations

import os
import stat
import tarfile
import zipfile

from roi_mae_jax import errors


def _inside(dest: str, name: str) -> bool:
  target = os.path.realpath(os.path.join(dest, name))
  return not os.path.isabs(name) and os.path.commonpath([dest, target]) == dest


def _extract_zip(archive: str, dest: str) -> None:
  with zipfile.ZipFile(archive) as z:
    for info in z.infolist():
      mode = info.external_attr >> 16
      if stat.S_ISLNK(mode) or not _inside(dest, info.filename) or "\\" in info.filename:
        raise errors.InputError(f"{archive}: member {info.filename!r} would be written outside "
                                f"{dest} (or is a link); nothing was extracted")
    z.extractall(dest)


def _extract_tar(archive: str, dest: str) -> None:
  if not hasattr(tarfile, "data_filter"):
    raise errors.InputError(f"{archive}: this Python has no safe tar extraction (needs 3.11.4 "
                            "or later); upload a .zip instead")
  with tarfile.open(archive) as tar:
    members = tar.getmembers()
    for member in members:  # all checked before the first byte is written
      try:
        tarfile.data_filter(member, dest)
      except tarfile.FilterError as e:
        raise errors.InputError(f"{archive}: member {member.name!r} refused ({e}); nothing "
                                "was extracted") from None
      if member.issym() or member.islnk() or not _inside(dest, member.name):
        raise errors.InputError(f"{archive}: member {member.name!r} would be written outside "
                                f"{dest} (or is a link); nothing was extracted")
    tar.extractall(dest, members=members, filter="data")


def extract(archive: str, dest: str) -> str:
  """Extracts `archive` into `dest` (created); returns `dest` as an absolute path."""
  dest = os.path.realpath(dest)
  os.makedirs(dest, exist_ok=True)
  if zipfile.is_zipfile(archive):
    _extract_zip(archive, dest)
  elif tarfile.is_tarfile(archive):
    _extract_tar(archive, dest)
  else:
    raise errors.InputError(f"{archive} is neither a .zip nor a tar archive")
  return dest
