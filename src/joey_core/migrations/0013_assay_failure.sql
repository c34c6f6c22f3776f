-- An assay whose values cannot be computed or counted (a definition the registry's checks did not
-- catch, or one written around them) marks itself failed instead of stopping the loggers: it is no
-- longer counted or scored, and says why. NULL while it works.
ALTER TABLE assays ADD COLUMN failure text;
ALTER TABLE assays ADD COLUMN failed_at timestamptz;
