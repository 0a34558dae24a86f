from services.validator.service import ValidatorService

__all__ = ["ValidatorService"]
