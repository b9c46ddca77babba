"""The privacy budget's errors: what a site refuses to do with its budget, and why."""


class PrivacyBudgetError(RuntimeError):
    """The privacy budget can not be used as asked; the message says why and what to do."""


class LedgerCorruptError(PrivacyBudgetError):
    """``ledger.json`` can not be read. The site must refuse to train until an admin acts."""


class LedgerPlanMismatchError(PrivacyBudgetError):
    """The configuration asks for a privacy plan incompatible with the budget already spent."""
