"""Study loading: DICOM / PNG / JPEG -> Study, with limits and de-identification."""
from .errors import CODES, StudyLoadError
from .limits import LoadLimits
from .load import load_studies, load_study, load_view

__all__ = ["CODES", "LoadLimits", "StudyLoadError", "load_studies", "load_study", "load_view"]
