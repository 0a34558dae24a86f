from services.controller.service import ControllerService

__all__ = ["ControllerService"]
