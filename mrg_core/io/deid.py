"""De-identification by construction.

Only the attributes in ALLOWED ever leave a DICOM dataset (as ViewMeta fields); everything else,
private tags included, stays inside the loader. BASIC_PROFILE lists the attributes of the DICOM
PS3.15 Annex E Basic Application Level Confidentiality Profile (table E.1-1, by keyword): the
tests fill all of them with markers and prove none reaches a Study, a summary or the CLI. The
allow-list is the guarantee; the profile list is the proof. The profile's repeating groups
(overlays 60xx, curves 50xx) and all private tags have no keyword here: they are never read
either.
"""
from __future__ import annotations

import math
import re

from ..study import ViewMeta

# DICOM keywords read by safe_meta(); none of them is in BASIC_PROFILE (checked by a test).
ALLOWED: tuple[str, ...] = (
    "Modality", "BodyPartExamined", "ViewPosition", "PixelSpacing", "ImagerPixelSpacing",
    "PhotometricInterpretation", "Manufacturer", "BitsStored", "Rows", "Columns",
    "ImagePositionPatient", "ImageOrientationPatient", "SliceThickness", "InstanceNumber",
    "SeriesNumber", "ConvolutionKernel",
)
# Read only to group files into series and to refuse an upload that mixes patients: they
# leave this module as salted hashes that live for one load call (group_key), never as values.
GROUPING_ONLY: tuple[str, ...] = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID")

BASIC_PROFILE: tuple[str, ...] = (
    "AccessionNumber", "AcquisitionComments", "AcquisitionContextSequence", "AcquisitionDate",
    "AcquisitionDateTime", "AcquisitionDeviceProcessingDescription",
    "AcquisitionProtocolDescription", "AcquisitionTime", "ActualHumanPerformersSequence",
    "AdditionalPatientHistory", "AdmissionID", "AdmittingDate", "AdmittingDiagnosesCodeSequence",
    "AdmittingDiagnosesDescription", "AdmittingTime", "AffectedSOPInstanceUID", "Allergies",
    "AuthorObserverSequence", "BranchOfService", "CassetteID",
    "ClinicalTrialCoordinatingCenterName", "ClinicalTrialProtocolEthicsCommitteeApprovalNumber",
    "ClinicalTrialProtocolEthicsCommitteeName", "ClinicalTrialProtocolID",
    "ClinicalTrialProtocolName", "ClinicalTrialSeriesDescription", "ClinicalTrialSeriesID",
    "ClinicalTrialSiteID", "ClinicalTrialSiteName", "ClinicalTrialSponsorName",
    "ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID",
    "ClinicalTrialTimePointDescription", "ClinicalTrialTimePointID",
    "CommentsOnThePerformedProcedureStep", "ConcatenationUID",
    "ConfidentialityConstraintOnPatientDataDescription", "ContentCreatorName",
    "ContentCreatorIdentificationCodeSequence", "ContentDate", "ContentSequence", "ContentTime",
    "ContextGroupExtensionCreatorUID", "ContrastBolusAgent", "ContributionDescription",
    "CountryOfResidence", "CreatorVersionUID", "CurrentPatientLocation", "CurveDate",
    "CurveTime", "CustodialOrganizationSequence", "DataSetTrailingPadding",
    "DerivationDescription", "DetectorID", "DeviceSerialNumber", "DeviceUID",
    "DigitalSignatureUID", "DigitalSignaturesSequence", "DimensionOrganizationUID",
    "DischargeDiagnosisDescription", "DistributionAddress", "DistributionName",
    "DoseReferenceUID", "EndAcquisitionDateTime", "EthnicGroup",
    "ExpectedCompletionDateTime", "FailedSOPInstanceUIDList", "FiducialUID",
    "FillerOrderNumberImagingServiceRequest", "FrameComments", "FrameOfReferenceUID",
    "GantryID", "GeneratorID", "GraphicAnnotationSequence", "HumanPerformerName",
    "HumanPerformerOrganization", "IconImageSequence", "IdentifyingComments", "ImageComments",
    "ImagePresentationComments", "ImagingServiceRequestComments", "Impressions",
    "InstanceCoercionDateTime", "InstanceCreatorUID", "InstitutionAddress",
    "InstitutionCodeSequence", "InstitutionName", "InstitutionalDepartmentName",
    "InsurancePlanIdentification", "IntendedRecipientsOfResultsIdentificationSequence",
    "InterpretationApproverSequence", "InterpretationAuthor",
    "InterpretationDiagnosisDescription", "InterpretationIDIssuer", "InterpretationRecorder",
    "InterpretationText", "InterpretationTranscriber", "IrradiationEventUID",
    "IssuerOfAdmissionID", "IssuerOfPatientID", "IssuerOfServiceEpisodeID",
    "LargePaletteColorLookupTableUID", "LastMenstrualDate", "MAC",
    "MediaStorageSOPInstanceUID", "MedicalAlerts", "MedicalRecordLocator", "MilitaryRank",
    "ModifiedAttributesSequence", "ModifiedImageDescription", "ModifyingDeviceID",
    "ModifyingDeviceManufacturer", "NameOfPhysiciansReadingStudy",
    "NamesOfIntendedRecipientsOfResults", "Occupation", "OperatorIdentificationSequence",
    "OperatorsName", "OrderCallbackPhoneNumber", "OrderEnteredBy", "OrderEntererLocation",
    "OriginalAttributesSequence", "OtherPatientIDs", "OtherPatientIDsSequence",
    "OtherPatientNames", "OverlayDate", "OverlayTime",
    "ParticipantSequence", "PatientAddress", "PatientAge", "PatientBirthDate",
    "PatientBirthName", "PatientBirthTime", "PatientComments", "PatientID",
    "PatientInstitutionResidence", "PatientInsurancePlanCodeSequence",
    "PatientMotherBirthName", "PatientName", "PatientPrimaryLanguageCodeSequence",
    "PatientPrimaryLanguageModifierCodeSequence", "PatientReligiousPreference", "PatientSex",
    "PatientSexNeutered", "PatientSize", "PatientState", "PatientTelephoneNumbers",
    "PatientTransportArrangements", "PatientWeight", "PerformedLocation",
    "PerformedProcedureStepDescription", "PerformedProcedureStepEndDate",
    "PerformedProcedureStepEndDateTime", "PerformedProcedureStepEndTime",
    "PerformedProcedureStepID", "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartDateTime", "PerformedProcedureStepStartTime",
    "PerformedStationAETitle", "PerformedStationGeographicLocationCodeSequence",
    "PerformedStationName", "PerformedStationNameCodeSequence",
    "PerformingPhysicianIdentificationSequence", "PerformingPhysicianName", "PersonAddress",
    "PersonIdentificationCodeSequence", "PersonName", "PersonTelephoneNumbers",
    "PhysicianApprovingInterpretation", "PhysiciansOfRecord",
    "PhysiciansOfRecordIdentificationSequence", "PhysiciansReadingStudyIdentificationSequence",
    "PlacerOrderNumberImagingServiceRequest", "PlateID", "PreMedication", "PregnancyStatus",
    "ProtocolName", "ReasonForStudy", "ReasonForTheImagingServiceRequest",
    "ReferencedDigitalSignatureSequence", "ReferencedFrameOfReferenceUID",
    "ReferencedGeneralPurposeScheduledProcedureStepTransactionUID", "ReferencedImageSequence",
    "ReferencedPatientAliasSequence", "ReferencedPatientPhotoSequence",
    "ReferencedPatientSequence", "ReferencedPerformedProcedureStepSequence",
    "ReferencedSOPInstanceMACSequence", "ReferencedSOPInstanceUID",
    "ReferencedSOPInstanceUIDInFile", "ReferencedStudySequence", "ReferringPhysicianAddress",
    "ReferringPhysicianIdentificationSequence", "ReferringPhysicianName",
    "ReferringPhysicianTelephoneNumbers", "RegionOfResidence", "RelatedFrameOfReferenceUID",
    "RequestAttributesSequence", "RequestedContrastAgent", "RequestedProcedureComments",
    "RequestedProcedureDescription", "RequestedProcedureID", "RequestedProcedureLocation",
    "RequestedSOPInstanceUID", "RequestingPhysician", "RequestingService",
    "ResponsibleOrganization", "ResponsiblePerson", "ResultsComments",
    "ResultsDistributionListSequence", "ResultsIDIssuer", "ReviewerName",
    "ScheduledHumanPerformersSequence", "ScheduledPatientInstitutionResidence",
    "ScheduledPerformingPhysicianIdentificationSequence", "ScheduledPerformingPhysicianName",
    "ScheduledProcedureStepDescription", "ScheduledProcedureStepEndDate",
    "ScheduledProcedureStepEndTime", "ScheduledProcedureStepLocation",
    "ScheduledProcedureStepStartDate", "ScheduledProcedureStepStartTime",
    "ScheduledStationAETitle", "ScheduledStationGeographicLocationCodeSequence",
    "ScheduledStationName", "ScheduledStationNameCodeSequence", "ScheduledStudyLocation",
    "ScheduledStudyLocationAETitle", "SeriesDate", "SeriesDescription", "SeriesInstanceUID",
    "SeriesTime", "ServiceEpisodeDescription", "ServiceEpisodeID", "SmokingStatus",
    "SOPInstanceUID", "SourceImageSequence", "SpecialNeeds", "StationName",
    "StorageMediaFileSetUID", "StudyComments", "StudyDate", "StudyDescription", "StudyID",
    "StudyIDIssuer", "StudyInstanceUID", "StudyTime", "SynchronizationFrameOfReferenceUID",
    "TargetUID", "TemplateExtensionCreatorUID", "TemplateExtensionOrganizationUID",
    "TextComments", "TextString", "TimezoneOffsetFromUTC", "TopicAuthor", "TopicKeywords",
    "TopicSubject", "TopicTitle", "TransactionUID", "UID",
    "VerifyingObserverIdentificationCodeSequence",
    "VerifyingObserverName", "VerifyingObserverSequence", "VerifyingOrganization",
    "VisitComments", "DateOfLastCalibration", "TimeOfLastCalibration",
    "DateOfSecondaryCapture", "TimeOfSecondaryCapture",
    "StudyArrivalDate", "StudyArrivalTime", "StudyCompletionDate", "StudyCompletionTime",
    "StudyVerifiedDate", "StudyVerifiedTime", "StudyReadDate", "StudyReadTime",
    "ScheduledStudyStartDate", "ScheduledStudyStartTime", "ScheduledStudyStopDate",
    "ScheduledStudyStopTime", "ScheduledAdmissionDate", "ScheduledAdmissionTime",
    "ScheduledDischargeDate", "ScheduledDischargeTime", "DischargeDate", "DischargeTime",
    "PresentationCreationDate", "PresentationCreationTime", "InstanceCreationDate",
    "InstanceCreationTime", "PatientBirthDateInAlternativeCalendar",
    "PatientDeathDateInAlternativeCalendar", "PatientAlternativeCalendar",
    "CalibrationDate", "CalibrationTime",
)

_CODE_STRING = re.compile(r"[^A-Z0-9_ ]")
_PRINTABLE = re.compile(r"[^\x20-\x7e]")


def _get(ds, keyword):
    """A value, or None when absent or unreadable (a damaged header must not stop the view)."""
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - any decoding problem of an optional attribute
        return None
    return None if value is None or value == "" else value


def _code_string(value, max_len: int = 16) -> str | None:
    if value is None:
        return None
    text = _CODE_STRING.sub("", str(value).upper()).strip()
    return text[:max_len] or None


def _text(value, max_len: int = 64) -> str | None:
    if value is None:
        return None
    text = _PRINTABLE.sub("", str(value)).strip()
    return text[:max_len] or None


def _spacing(ds) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = _get(ds, keyword)
        try:
            row, col = (float(v) for v in value)
        except (TypeError, ValueError):
            continue
        if all(math.isfinite(v) and 0 < v < 1000 for v in (row, col)):
            return row, col
    return None


def _bits(ds) -> int | None:
    try:
        bits = int(_get(ds, "BitsStored"))
    except (TypeError, ValueError):
        return None
    return bits if 1 <= bits <= 32 else None


def _floats(value, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) and abs(v) < 1e6 for v in out) \
        else None


def _slice_position(ds) -> float | None:
    """Position of the slice along its normal (mm): ImagePositionPatient · (row × column)."""
    pos = _floats(_get(ds, "ImagePositionPatient"), 3)
    ori = _floats(_get(ds, "ImageOrientationPatient"), 6)
    if pos is None or ori is None:
        return None
    r, c = ori[:3], ori[3:]
    normal = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    if sum(v * v for v in normal) < 0.5:  # not two unit vectors at right angles
        return None
    return round(sum(p * n for p, n in zip(pos, normal)), 4)


def _positive(value, upper: float) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and 0 < v < upper else None


def _int(value) -> int | None:
    try:
        v = int(value)
    except (TypeError, ValueError):
        return None
    return v if -2**31 <= v < 2**31 else None


def series_facts(ds) -> tuple[int | None, str | None]:
    """(SeriesNumber, ConvolutionKernel) for SeriesInfo, sanitised."""
    kernel = _get(ds, "ConvolutionKernel")
    if isinstance(kernel, (list, tuple)) or type(kernel).__name__ == "MultiValue":
        kernel = kernel[0] if len(kernel) else None
    return _int(_get(ds, "SeriesNumber")), _text(kernel, 16)


def group_key(ds, salt: bytes) -> tuple[str | None, str | None, str | None]:
    """(patient, study, series) as salted sha256 prefixes; None where the attribute is absent.
    The salt is new for every load call, so a key cannot be matched against anything else."""
    import hashlib

    def h(keyword):
        value = _get(ds, keyword)
        if value is None:
            return None
        return hashlib.sha256(salt + str(value).strip().encode("utf-8", "replace")).hexdigest()[:16]

    return tuple(h(k) for k in GROUPING_ONLY)


def safe_meta(ds, rows: int, columns: int, frame_index: int = 0, units: str = "raw") -> ViewMeta:
    """ViewMeta from a pydicom dataset, reading only ALLOWED attributes, each sanitised."""
    return ViewMeta(
        source_format="dicom",
        rows=int(rows),
        columns=int(columns),
        modality=_code_string(_get(ds, "Modality")),
        body_part=_code_string(_get(ds, "BodyPartExamined")),
        view_position=_code_string(_get(ds, "ViewPosition")),
        pixel_spacing=_spacing(ds),
        photometric=_code_string(_get(ds, "PhotometricInterpretation")),
        manufacturer=_text(_get(ds, "Manufacturer")),
        bits_stored=_bits(ds),
        frame_index=int(frame_index),
        units=units,
        slice_position=_slice_position(ds),
        slice_thickness=_positive(_get(ds, "SliceThickness"), 1000),
        instance_number=_int(_get(ds, "InstanceNumber")),
    )
