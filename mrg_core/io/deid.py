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
)

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
    )
