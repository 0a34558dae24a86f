from services.hypothesizer.service import HypothesizerService

__all__ = ["HypothesizerService"]
