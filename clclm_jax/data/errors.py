"""One error type for bad input data: it names the file, the record, the problem and the fix."""

import os


class DataError(ValueError):
  """Bad input data, rendered as one line: `path[record index]: problem; fix`."""

  def __init__(self, path: str | os.PathLike | None, index: int | None, problem: str, fix: str):
    self.path, self.index, self.problem, self.fix = path, index, problem, fix
    where = str(path) if path is not None else "<memory>"
    if index is not None:
      where += f" record {index}"
    super().__init__(f"{where}: {problem}; fix: {fix}")
